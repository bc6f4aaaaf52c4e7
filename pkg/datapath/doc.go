// Package datapath owns the node's kernel routing state for meshcrypt: the routes that send
// remote pod CIDRs through the tunnel device and the policy-routing rules that make them take
// precedence over the underlay routes a CNI installed. (Later: BPF objects and their attachment.)
//
// It is the kernel edge: it takes a *netlink.Handle bound to a namespace and applies desired
// state given as values. It imports no client-go and no Kubernetes types.
package datapath
