// Package identitytest holds an in-memory identity.Store for tests of the allocator and of its
// callers: Create is atomic under a mutex as the API server's create is, calls are counted,
// failures and interleavings can be injected, and String prints the sorted contents.
//
// Like package identity it must not import anything under k8s.io or sigs.k8s.io, nor netlink,
// wgctrl or cilium/ebpf.
package identitytest
