// Package controlplane runs a real Kubernetes control plane, etcd plus kube-apiserver, as child
// processes on loopback, for meshcrypt's control-plane and e2e tests and for `make demo`.
//
// A ControlPlane owns one temporary directory (named meshcrypt-cp-*, mode 0700) holding
// everything it generates: a CA and serving certificate, the service-account signing key (so
// the TokenRequest API issues bound tokens), a static token file (an admin in system:masters
// plus the users the caller asked for), etcd's data directory and both processes' logs. The
// API server authorizes with RBAC and keeps its default admission chain, including
// ValidatingAdmissionPolicy, except the ServiceAccount plugin: no controller manager runs, so
// no namespace has a default ServiceAccount, and Pods (with spec.nodeName set directly) must be
// creatable without one. For the same reason nothing garbage-collects, and a deleted Namespace
// stays Terminating.
//
// The core API takes a context and returns errors, so ordinary programs can use it; StartT
// wraps Start for tests. Fault-injection tests stop and restart either process in place
// (same ports, certificates and data), so clients keep working across a restart.
//
// The binaries: etcd from $MESHCRYPT_ETCD or $PATH (Debian's etcd-server); kube-apiserver from
// Options.KubeAPIServer, $MESHCRYPT_KUBE_APISERVER, or hack/kube-apiserver.sh of the enclosing
// module, which builds it once and caches it.
//
// This package is test infrastructure: product code under pkg/ and cmd/ must not import it.
package controlplane
