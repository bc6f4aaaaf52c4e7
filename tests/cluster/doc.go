// Package cluster joins the test harness's parts into a running meshcrypt cluster on one
// machine: a real kube-apiserver and etcd (tests/controlplane), nodes and pods as network
// namespaces (tests/netenv), Node and Pod objects in the API server to match, and one real
// meshcrypt-agent process per node running inside its node's namespace with its own
// kubeconfig, state dir and WireGuard interface name. The e2e suites and `make demo` use it.
//
// # Control plane: its own or an external one
//
// By default Start starts a control plane of its own and applies the manifests the agents
// need to it (ApplyManifests: manifests/crds, rbac, admission); Close stops it.
//
// Given the admin kubeconfig of an external control plane (Options.Kubeconfig, by default
// $MESHCRYPT_KUBECONFIG), Start starts and applies nothing: whoever runs that control plane
// applies the manifests first (ApplyManifests). The clients use the kubeconfig, the node
// namespaces' forwarders connect to its server's address, and the agents' kubeconfigs carry
// its CA and the name its certificate is checked against. This is how tests/vm runs the e2e
// suites inside the VM against the host's kube-apiserver (at 10.0.2.2 through qemu's user
// network).
//
// Consecutive clusters share an external control plane. Each gets a clean one all the same:
// Start deletes every meshcrypt.io object, Node, Pod and Event, and the Secrets of the agent's
// namespace, that an earlier cluster left, however it ended (a crash, a timeout); Close leaves
// its objects in place for a look afterwards. Clearing at Start rather than at Close means
// no cluster depends on its predecessor having cleaned up. A test that stops or restarts the
// control plane calls NeedOwnControlPlane, which skips it against an external one: it is not
// the test's to stop, and it runs where the cluster starts its own (the host's e2e run).
package cluster
