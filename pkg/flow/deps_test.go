package flow

import (
	"testing"

	"github.com/meshcrypt/meshcrypt/internal/deptest"
)

// TestDeps guards the boundary stated in doc.go: the wire format stays free of the agent's
// kernel edge and of client-go, so the CLI decodes flows without them.
func TestDeps(t *testing.T) {
	deptest.Check(t, deptest.Rules{
		Packages: []string{"."},
		Banned: []string{
			"k8s.io/client-go", "sigs.k8s.io/",
			"github.com/vishvananda/netlink", "github.com/cilium/ebpf", "golang.zx2c4.com/wireguard",
		},
		Own: []string{"pkg/flow", "pkg/identity"},
	})
}
