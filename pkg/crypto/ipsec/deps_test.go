package ipsec

import (
	"testing"

	"github.com/meshcrypt/meshcrypt/internal/deptest"
)

// TestDeps guards the package boundary stated in doc.go: no Kubernetes client libraries, no
// eBPF, no WireGuard, no other meshcrypt packages.
func TestDeps(t *testing.T) {
	deptest.Check(t, deptest.Rules{
		Packages: []string{".", "./ipsectest"},
		Banned:   []string{"k8s.io/", "sigs.k8s.io/", "github.com/cilium/ebpf", "golang.zx2c4.com/"},
		Own:      []string{"pkg/crypto/ipsec"},
	})
}
