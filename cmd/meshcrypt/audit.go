package main

import (
	"context"
	"fmt"
	"io"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
)

// eventNamespace holds the Events about the cluster-scoped MeshConfig, as Kubernetes does for
// cluster-scoped objects.
const eventNamespace = "default"

// recordChange leaves the audit trail of an operator's change: a Kubernetes Event on the
// MeshConfig (reason, and a message naming who) and the same line on out. An Event the
// caller may not create is reported as a warning; the change itself stands.
func recordChange(ctx context.Context, c client.Client, out io.Writer, reason, message string) {
	now := metav1.NewTime(time.Now())
	ref := corev1.ObjectReference{APIVersion: v1alpha1.GroupVersion.String(), Kind: "MeshConfig", Name: v1alpha1.MeshConfigName}
	var mc v1alpha1.MeshConfig
	if err := c.Get(ctx, client.ObjectKey{Name: v1alpha1.MeshConfigName}, &mc); err == nil {
		ref.UID, ref.ResourceVersion = mc.UID, mc.ResourceVersion
	}
	ev := &corev1.Event{
		ObjectMeta:          metav1.ObjectMeta{GenerateName: "meshconfig-", Namespace: eventNamespace},
		InvolvedObject:      ref,
		Reason:              reason,
		Message:             message,
		Type:                corev1.EventTypeNormal,
		Source:              corev1.EventSource{Component: "meshcrypt-cli"},
		ReportingController: "meshcrypt.io/cli",
		ReportingInstance:   "meshcrypt-cli",
		FirstTimestamp:      now,
		LastTimestamp:       now,
		Count:               1,
	}
	if err := c.Create(ctx, ev); err != nil {
		fmt.Fprintf(out, "warning: no Event recorded for the audit trail: %s\n", describe(err))
		return
	}
	fmt.Fprintf(out, "recorded Event %s/%s: %s\n", eventNamespace, reason, message)
}

// byWhom is " by USER" for an audit message, or "" when the API server did not say who.
func byWhom(user string) string {
	if user == "" {
		return ""
	}
	return " by " + user
}
