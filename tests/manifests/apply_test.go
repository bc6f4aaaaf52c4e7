package manifests

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/restmapper"

	"github.com/meshcrypt/meshcrypt/tests/controlplane"
)

// dryRunner applies objects to a real API server with server-side apply in dry-run mode
// (every admission step and validation runs, nothing is stored) and strict field
// validation (an unknown or duplicate field is an error, not a warning).
type dryRunner struct {
	dyn    dynamic.Interface
	mapper *restmapper.DeferredDiscoveryRESTMapper
}

func newDryRunner(t *testing.T, cp *controlplane.ControlPlane) *dryRunner {
	t.Helper()
	cfg := cp.RESTConfig()
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	disco, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return &dryRunner{dyn: dyn, mapper: restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(disco))}
}

func (d *dryRunner) apply(ctx context.Context, o object) error {
	gvk := o.obj.GroupVersionKind()
	mapping, err := d.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
	if meta.IsNoMatchError(err) {
		d.mapper.Reset()
		mapping, err = d.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
	}
	if err != nil {
		return err
	}
	var ri dynamic.ResourceInterface = d.dyn.Resource(mapping.Resource)
	if mapping.Scope.Name() == meta.RESTScopeNameNamespace {
		if o.obj.GetNamespace() == "" {
			return fmt.Errorf("namespaced %s has no namespace (a plain kubectl apply would put it in the user's current one)", gvk.Kind)
		}
		ri = d.dyn.Resource(mapping.Resource).Namespace(o.obj.GetNamespace())
	} else if o.obj.GetNamespace() != "" {
		return fmt.Errorf("cluster-scoped %s has a namespace", gvk.Kind)
	}
	data, err := json.Marshal(o.obj.Object)
	if err != nil {
		return err
	}
	force := true
	_, err = ri.Patch(ctx, o.obj.GetName(), types.ApplyPatchType, data, metav1.PatchOptions{
		DryRun:          []string{metav1.DryRunAll},
		FieldManager:    "meshcrypt-manifests-test",
		Force:           &force,
		FieldValidation: "Strict",
	})
	return err
}

// TestDryRun: every object the chart renders (defaults, every value set, mode WireGuard) and
// every plain manifest is accepted by a real kube-apiserver. The CRDs are applied for real
// first, and the namespace meshcrypt created, as an install would.
func TestDryRun(t *testing.T) {
	cp := controlplane.StartT(t, controlplane.Options{})
	ctx := t.Context()
	if err := cp.ApplyCRDs(ctx, path(t, crdDir)); err != nil {
		t.Fatal(err)
	}
	cs, err := kubernetes.NewForConfig(cp.RESTConfig())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: agentNamespace}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	d := newDryRunner(t, cp)

	type set struct {
		name string
		objs []object
	}
	defaults := parseObjects(t, "chart defaults", []byte(mustRender(t, renderOptions{})))
	sets := []set{
		{"chart defaults", defaults},
		{"chart all values", parseObjects(t, "chart all values", []byte(mustRender(t, renderOptions{values: readValues(t, allValuesFile)})))},
		{"chart WireGuard", parseObjects(t, "chart WireGuard", []byte(mustRender(t, renderOptions{
			values: map[string]any{"encryption": map[string]any{"mode": "WireGuard"}},
		})))},
		{installFile, readObjects(t, installFile)},
		{rbacFile, readObjects(t, rbacFile)},
		{admissionDir, readObjects(t, admissionDir)},
		{crdDir, readObjects(t, crdDir)},
		{chartDir + "/crds", readObjects(t, chartDir+"/crds")},
	}
	for _, s := range sets {
		if len(s.objs) == 0 {
			t.Errorf("%s: no objects", s.name)
		}
		for _, o := range s.objs {
			t.Run(s.name+"/"+o.key(), func(t *testing.T) {
				if err := d.apply(ctx, o); err != nil {
					t.Errorf("%s: rejected: %v", o.source, err)
				}
			})
		}
	}

	// The check has teeth: the same API server refuses a misspelt field and a bad mode.
	ds := find(t, defaults, "DaemonSet")
	bad := ds.DeepCopy()
	spec := bad.Object["spec"].(map[string]any)
	spec["updateStrategy"].(map[string]any)["rollingUpdate"].(map[string]any)["maxUnavailabel"] = 1
	if err := d.apply(ctx, object{source: "misspelt", obj: bad}); err == nil || !strings.Contains(err.Error(), "maxUnavailabel") {
		t.Errorf("a DaemonSet with a misspelt field: err = %v, want it named", err)
	}
	mc := find(t, defaults, "MeshConfig").DeepCopy()
	mc.Object["spec"].(map[string]any)["encryption"].(map[string]any)["mode"] = "Bogus"
	if err := d.apply(ctx, object{source: "bad mode", obj: mc}); err == nil || !strings.Contains(err.Error(), "Bogus") {
		t.Errorf("a MeshConfig with mode Bogus: err = %v, want a rejection", err)
	}
	// Dry run stored nothing.
	if dss, err := cs.AppsV1().DaemonSets(agentNamespace).List(ctx, metav1.ListOptions{}); err != nil || len(dss.Items) != 0 {
		t.Errorf("after dry runs: %d DaemonSets, err %v; want none", len(dss.Items), err)
	}
}
