package wireguard

import (
	"os/exec"
	"strings"
	"testing"
)

// TestDeps guards the package boundary stated in doc.go: no Kubernetes
// client libraries, no other meshcrypt packages, no eBPF.
func TestDeps(t *testing.T) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("go command not in PATH: cannot list dependencies")
	}
	for _, pkg := range []string{".", "./wgtest"} {
		out, err := exec.Command(goTool, "list", "-deps", pkg).Output()
		if err != nil {
			t.Fatalf("go list -deps %s: %v", pkg, err)
		}
		for dep := range strings.FieldsSeq(string(out)) {
			for _, bad := range []string{"k8s.io/", "sigs.k8s.io/", "github.com/cilium/ebpf"} {
				if strings.HasPrefix(dep, bad) {
					t.Errorf("%s depends on %s", pkg, dep)
				}
			}
			if strings.HasPrefix(dep, "github.com/meshcrypt/meshcrypt/") && !strings.HasPrefix(dep, "github.com/meshcrypt/meshcrypt/pkg/crypto/wireguard") {
				t.Errorf("%s depends on %s", pkg, dep)
			}
		}
	}
}
