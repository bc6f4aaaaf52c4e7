package ipsec

import (
	"os/exec"
	"strings"
	"testing"
)

// TestDeps guards the package boundary stated in doc.go: no Kubernetes
// client libraries, no eBPF, no WireGuard, no other meshcrypt packages.
func TestDeps(t *testing.T) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("go command not in PATH: cannot list dependencies")
	}
	for _, pkg := range []string{".", "./ipsectest"} {
		out, err := exec.Command(goTool, "list", "-deps", pkg).Output()
		if err != nil {
			t.Fatalf("go list -deps %s: %v", pkg, err)
		}
		for dep := range strings.FieldsSeq(string(out)) {
			for _, bad := range []string{"k8s.io/", "sigs.k8s.io/", "github.com/cilium/ebpf", "golang.zx2c4.com/"} {
				if strings.HasPrefix(dep, bad) {
					t.Errorf("%s depends on %s", pkg, dep)
				}
			}
			if strings.HasPrefix(dep, "github.com/meshcrypt/meshcrypt/") && !strings.HasPrefix(dep, "github.com/meshcrypt/meshcrypt/pkg/crypto/ipsec") {
				t.Errorf("%s depends on %s", pkg, dep)
			}
		}
	}
}
