// Package e2e holds the end-to-end suites: real agents on network-namespace nodes against a
// real kube-apiserver and etcd, traffic carrying a known marker between pods, and a capture of
// the underlay that must never contain the marker while encryption is on, and must contain it
// while encryption is off (the positive control).
package e2e
