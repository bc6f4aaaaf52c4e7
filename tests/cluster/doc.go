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
//
// # Several clusters on one underlay (cluster mesh)
//
// Clusters can share one topology (Options.Net, or StartMeshT): one switch, so every node of
// every cluster has host-gateway routes to every other's pod CIDRs (mode Disabled between
// clusters is clear traffic on the underlay), while each cluster has its own control plane,
// agents, kubeconfigs, state dirs and logs. Underlay addresses and pod CIDRs never collide
// (the topology numbers nodes across clusters), nor do WireGuard interface names (numbered
// across the topology: UAPI sockets are host-global) or BPF pin dirs (one bpffs per topology,
// a directory per node). Node names are the topology's, so they must be unique across the
// clusters: AddNode refuses a name another cluster has, naming it. Inside every node, its own
// cluster's API server answers at 127.0.0.1:6443 and each other cluster's at the address
// APIServerURLFor gives (127.0.0.1:6443+n for the n-th cluster to join); KubeconfigFor builds
// a kubeconfig for that address, MergedKubeconfig one admin kubeconfig with a context per
// cluster (named after Options.Name). Options.Name and Options.ClusterID give each cluster
// its identity (agent flags and MeshConfig spec.cluster). A cluster's Close removes only its
// own nodes from a shared topology; the last one closes the topology (if a cluster created
// it) and the bpffs, whatever the order.
package cluster
