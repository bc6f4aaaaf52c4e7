package identity

import (
	"os/exec"
	"strings"
	"testing"
)

// TestDeps guards the boundary stated in doc.go: package identity and its fake are pure, with
// nothing from Kubernetes' client libraries, the kernel edge or other meshcrypt packages.
func TestDeps(t *testing.T) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("go command not in PATH: cannot list dependencies")
	}
	bad := []string{
		"k8s.io/", "sigs.k8s.io/",
		"github.com/vishvananda/netlink", "github.com/cilium/ebpf", "golang.zx2c4.com/wireguard",
	}
	for _, pkg := range []string{".", "./identitytest"} {
		out, err := exec.Command(goTool, "list", "-deps", pkg).Output()
		if err != nil {
			t.Fatalf("go list -deps %s: %v", pkg, err)
		}
		for dep := range strings.FieldsSeq(string(out)) {
			for _, b := range bad {
				if strings.HasPrefix(dep, b) {
					t.Errorf("%s depends on %s", pkg, dep)
				}
			}
			if strings.HasPrefix(dep, "github.com/meshcrypt/meshcrypt/") &&
				!strings.HasPrefix(dep, "github.com/meshcrypt/meshcrypt/pkg/identity") {
				t.Errorf("%s depends on %s", pkg, dep)
			}
			if strings.HasPrefix(dep, "github.com/meshcrypt/meshcrypt/pkg/identity/kube") {
				t.Errorf("%s depends on %s", pkg, dep)
			}
		}
	}
}
