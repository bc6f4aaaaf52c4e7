package cluster

import (
	"context"
	"fmt"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// The agent's ServiceAccount, as in manifests/rbac.
const (
	AgentNamespace      = "meshcrypt"
	AgentServiceAccount = "meshcrypt-agent"
)

// AgentToken does what the kubelet does for a DaemonSet pod of the agent on node: it creates
// the agent's Pod bound to the node and requests a ServiceAccount token bound to that Pod. The
// API server puts the node's name into the token's user info, which the MeshNode admission
// policy checks. The Pod runs nothing; it exists so the token is bound to the node.
func AgentToken(ctx context.Context, cs kubernetes.Interface, node string) (string, error) {
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "meshcrypt-agent-" + node, Namespace: AgentNamespace,
			Labels: map[string]string{"app.kubernetes.io/name": "meshcrypt-agent"}},
		Spec: corev1.PodSpec{
			NodeName:           node,
			ServiceAccountName: AgentServiceAccount,
			HostNetwork:        true,
			Containers:         []corev1.Container{{Name: "agent", Image: "meshcrypt.invalid/agent:none"}},
		},
	}
	created, err := cs.CoreV1().Pods(AgentNamespace).Create(ctx, pod, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		created, err = cs.CoreV1().Pods(AgentNamespace).Get(ctx, pod.Name, metav1.GetOptions{})
	}
	if err != nil {
		return "", fmt.Errorf("agent pod for %s: %w", node, err)
	}
	exp := int64(24 * 3600)
	tr, err := cs.CoreV1().ServiceAccounts(AgentNamespace).CreateToken(ctx, AgentServiceAccount, &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{
			ExpirationSeconds: &exp,
			BoundObjectRef:    &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: created.Name, UID: created.UID},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("token for the agent of %s: %w", node, err)
	}
	return tr.Status.Token, nil
}
