package policy

import (
	"testing"

	"github.com/meshcrypt/meshcrypt/internal/deptest"
)

// TestDeps keeps the package pure: no client-go, netlink, wgctrl or ebpf among its imports.
func TestDeps(t *testing.T) {
	deptest.Check(t, deptest.Rules{
		Packages: []string{"."},
		Banned: []string{"k8s.io/client-go", "github.com/vishvananda/netlink", "golang.zx2c4.com/wireguard",
			"github.com/cilium/ebpf", "sigs.k8s.io/controller-runtime"},
	})
}
