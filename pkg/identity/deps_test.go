package identity

import (
	"testing"

	"github.com/meshcrypt/meshcrypt/internal/deptest"
)

// TestDeps guards the boundary stated in doc.go: package identity and its fake are pure, with
// nothing from Kubernetes' client libraries, the kernel edge or other meshcrypt packages (the
// client-go adapter in ./kube included).
func TestDeps(t *testing.T) {
	deptest.Check(t, deptest.Rules{
		Packages: []string{".", "./identitytest"},
		Banned: []string{
			"k8s.io/", "sigs.k8s.io/",
			"github.com/vishvananda/netlink", "github.com/cilium/ebpf", "golang.zx2c4.com/wireguard",
			deptest.Module + "pkg/identity/kube",
		},
		Own: []string{"pkg/identity"},
	})
}
