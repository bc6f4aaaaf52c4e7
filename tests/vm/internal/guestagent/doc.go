// Package guestagent runs real meshcrypt agents inside the VM (tests/vm)
// against a control plane on the host: two nodes built with tests/netenv, each
// agent forced onto kernel WireGuard and reaching the host's kube-apiserver at
// 10.0.2.2 through qemu's user network, and a full-size ping between pods on
// the two nodes through the tunnel. It is the VM harness's proof that the e2e
// suites can run there; see tests/vm's package documentation.
//
// Outside the VM, or without the control plane the host hands in
// ($MESHCRYPT_KUBECONFIG), the test skips.
package guestagent
