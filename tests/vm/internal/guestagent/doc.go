// Package guestagent runs real meshcrypt agents inside the VM (tests/vm)
// against a control plane on the host: two nodes built with tests/netenv, a
// MeshConfig in WireGuard mode, each agent forced onto kernel WireGuard and
// reaching the host's kube-apiserver at 10.0.2.2 through qemu's user network,
// and a full-size ping between pods on the two nodes through the tunnel. It is
// the small, first check of that path: TestE2EInVM runs it in the same boot
// before tests/e2e, so a broken connection to the host shows here, not as a
// dozen e2e failures. See tests/vm's package documentation.
//
// It expects a control plane that serves the CRDs and holds no Nodes named
// vm-a or vm-b. Outside the VM, or without the control plane the host hands
// in ($MESHCRYPT_KUBECONFIG, $MESHCRYPT_AGENT), the test skips.
package guestagent
