package policy

import (
	"os/exec"
	"strings"
	"testing"
)

// TestDeps keeps the package pure: no client-go, netlink, wgctrl or ebpf among its imports.
func TestDeps(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	for _, dep := range strings.Fields(string(out)) {
		for _, banned := range []string{"k8s.io/client-go", "github.com/vishvananda/netlink", "golang.zx2c4.com/wireguard", "github.com/cilium/ebpf", "sigs.k8s.io/controller-runtime"} {
			if strings.HasPrefix(dep, banned) {
				t.Errorf("pkg/policy depends on %s", dep)
			}
		}
	}
}
