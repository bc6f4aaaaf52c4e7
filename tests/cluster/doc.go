// Package cluster joins the test harness's parts into a running meshcrypt cluster on one
// machine: a real kube-apiserver and etcd (tests/controlplane), nodes and pods as network
// namespaces (tests/netenv), Node and Pod objects in the API server to match, and one real
// meshcrypt-agent process per node running inside its node's namespace with its own
// kubeconfig, state dir and WireGuard interface name. The e2e suites and `make demo` use it.
package cluster
