package agent

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
)

// configStatusPeriod is how often the lease holder refreshes MeshConfig status.
const configStatusPeriod = 2 * time.Second

// maxListed bounds how many nodes a condition message names.
const maxListed = 5

// configStatus summarises the MeshNodes' status for the MeshConfig's mode: Applied says
// whether every node applied the mode (and names those that did not, with their reason: a
// node refusing IPsec for lack of ESP, a FIPS node refusing WireGuard); Encrypted whether
// every node reports all its peers encrypted. It is pure; conditions keep their transition
// times from old.
func configStatus(mc *v1alpha1.MeshConfig, nodes []v1alpha1.MeshNode) v1alpha1.MeshConfigStatus {
	mode := mc.Spec.Encryption.Mode
	if mode == "" {
		mode = v1alpha1.ModeDisabled
	}
	st := v1alpha1.MeshConfigStatus{
		Conditions:         slices.Clone(mc.Status.Conditions),
		Nodes:              int32(len(nodes)),
		ObservedGeneration: mc.Generation,
	}
	var notApplied, notEncrypted []string
	for i := range nodes {
		mn := &nodes[i]
		ready := meta.FindStatusCondition(mn.Status.Conditions, v1alpha1.ConditionReady)
		switch {
		case mn.Status.Mode == mode && ready != nil && ready.Status == metav1.ConditionTrue:
			st.NodesApplied++
		case ready != nil && ready.Status == metav1.ConditionFalse:
			notApplied = append(notApplied, fmt.Sprintf("%s: %s", mn.Name, ready.Message))
		default:
			notApplied = append(notApplied, fmt.Sprintf("%s: mode %q applied, not yet %s", mn.Name, mn.Status.Mode, mode))
		}
		enc := meta.FindStatusCondition(mn.Status.Conditions, v1alpha1.ConditionEncrypted)
		if mode != v1alpha1.ModeDisabled && (enc == nil || enc.Status != metav1.ConditionTrue) {
			why := "no status yet"
			if enc != nil {
				why = enc.Message
			}
			notEncrypted = append(notEncrypted, fmt.Sprintf("%s: %s", mn.Name, why))
		}
	}
	set := func(t string, ok bool, reason, msg string) {
		s := metav1.ConditionFalse
		if ok {
			s = metav1.ConditionTrue
		}
		meta.SetStatusCondition(&st.Conditions, metav1.Condition{Type: t, Status: s, Reason: reason, Message: msg, ObservedGeneration: mc.Generation})
	}
	if len(notApplied) == 0 {
		set(v1alpha1.ConfigApplied, true, "AllNodesApplied", fmt.Sprintf("mode %s applied on all %d nodes", mode, len(nodes)))
	} else {
		set(v1alpha1.ConfigApplied, false, "NodesNotApplied", fmt.Sprintf("mode %s applied on %d of %d nodes; %s", mode, st.NodesApplied, len(nodes), listSome(notApplied)))
	}
	switch {
	case mode == v1alpha1.ModeDisabled:
		set(v1alpha1.ConfigEncrypted, false, "EncryptionDisabled", "encryption mode is Disabled")
	case len(notEncrypted) == 0:
		set(v1alpha1.ConfigEncrypted, true, "AllNodesEncrypted", fmt.Sprintf("all %d nodes report every peer encrypted (%s)", len(nodes), mode))
	default:
		set(v1alpha1.ConfigEncrypted, false, "NodesNotEncrypted", fmt.Sprintf("%d of %d nodes not fully encrypted; %s", len(notEncrypted), len(nodes), listSome(notEncrypted)))
	}
	return st
}

// listSome joins the first maxListed items and counts the rest.
func listSome(items []string) string {
	slices.Sort(items)
	if len(items) <= maxListed {
		return strings.Join(items, "; ")
	}
	return fmt.Sprintf("%s; and %d more", strings.Join(items[:maxListed], "; "), len(items)-maxListed)
}

// runConfigStatus keeps MeshConfig status current while ctx lasts (the agent holds the
// cluster's lease, so one agent writes it).
func (a *Agent) runConfigStatus(ctx context.Context) {
	t := time.NewTicker(configStatusPeriod)
	defer t.Stop()
	for {
		if err := a.publishConfigStatus(ctx); err != nil && ctx.Err() == nil {
			a.log.Warn("publish MeshConfig status", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// publishConfigStatus writes MeshConfig status when it changed.
func (a *Agent) publishConfigStatus(ctx context.Context) error {
	var mc v1alpha1.MeshConfig
	if err := a.cache.Get(ctx, client.ObjectKey{Name: v1alpha1.MeshConfigName}, &mc); err != nil {
		if apierrors.IsNotFound(err) {
			return nil
		}
		return err
	}
	var list v1alpha1.MeshNodeList
	if err := a.cache.List(ctx, &list); err != nil {
		return err
	}
	st := configStatus(&mc, list.Items)
	if equality.Semantic.DeepEqual(mc.Status, st) {
		return nil
	}
	patch := client.MergeFrom(mc.DeepCopy())
	mc.Status = st
	return a.client.Status().Patch(ctx, &mc, patch)
}
