// Package k8s runs a real Kubernetes cluster on this machine for meshcrypt's real-cluster tier
// (`make test-k8s`): the project's own image and install manifest on real kubelets.
//
// What is real: etcd and kube-apiserver (tests/controlplane, here with the ServiceAccount
// admission plugin, NodeRestriction and the Node,RBAC authorizers), kube-controller-manager
// (allocating Node.spec.podCIDR, creating ServiceAccounts, publishing kube-root-ca.crt),
// kube-scheduler, and per node containerd with runc (Debian's packages), a kubelet, kube-proxy
// in iptables mode and a CNI plugin of Debian's containernetworking-plugins (ptp or bridge, with
// host-local IPAM in the node's podCIDR). All Kubernetes binaries are v1.34.4, built from the
// k8s.io/kubernetes module by hack/kube-binaries.sh and cached in ~/.cache/meshcrypt. Pods are
// made by the kubelets; images come from containerd's store, nothing is pulled: they are built
// here with go-containerregistry (the agent image from bin/ laid out as the Dockerfile says, a
// pause image and a workload image from tests/k8s/internal) and imported with `ctr images
// import`.
//
// What is not: the nodes are network namespaces on one kernel, joined by a bridge in a
// "switch" namespace (tests/netenv) that the test captures as the underlay; the root namespace
// is plugged into it too and hosts the control plane, as a control-plane node would. Routing
// between nodes is host-gw (static routes to each node's podCIDR via its address). Each node
// has its own mount namespace (a slave of the host's, shared within itself) with a tmpfs over
// the paths kubelets and containerds would otherwise share (nodeTmpfs), and its own cgroup
// (the kubelet's cgroupRoot, cgroupfs driver). The kernel, /sys, /dev and the global sysctls are
// shared by all nodes: the kubelets' changes to vm.* and kernel.* sysctls are restored on Close.
// Kubelets authenticate with static tokens rather than bootstrap certificates, and serve
// without client authentication; no DNS runs in the cluster.
//
// Owners: a cluster's directory (os.TempDir()/meshcrypt-k8s-*) names its owner process;
// CleanupStale (run by StartT and tests/cleanup) removes clusters whose owner died, never a live
// run's.
//
// This package is test infrastructure: product code under pkg/ and cmd/ must not import it.
package k8s
