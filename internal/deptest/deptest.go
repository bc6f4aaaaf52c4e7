// Package deptest guards package boundaries (tailscale's deptest): a test lists a package's
// transitive imports with `go list -deps` and fails on any it must not have.
package deptest

import (
	"os/exec"
	"strings"
	"testing"
)

// Module is the project's module path.
const Module = "github.com/meshcrypt/meshcrypt/"

// Rules say what the packages under test may import.
type Rules struct {
	// Packages are the `go list` patterns checked, relative to the test's directory
	// (e.g. ".", "./wgtest").
	Packages []string
	// Banned are import path prefixes none of them may depend on.
	Banned []string
	// Own, when set, confines the project's own imports to these module-relative prefixes
	// (e.g. "pkg/crypto/wireguard", "internal/netnsutil"): every other package of this
	// module is banned. Empty allows any package of the module not otherwise banned.
	Own []string
}

// Check fails t for every dependency of the packages that the rules forbid.
func Check(t *testing.T, r Rules) {
	t.Helper()
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("go command not in PATH: cannot list dependencies")
	}
	for _, pkg := range r.Packages {
		out, err := exec.Command(goTool, "list", "-deps", pkg).Output()
		if err != nil {
			t.Fatalf("go list -deps %s: %v", pkg, err)
		}
		for dep := range strings.FieldsSeq(string(out)) {
			for _, bad := range r.Banned {
				if strings.HasPrefix(dep, bad) {
					t.Errorf("%s depends on %s", pkg, dep)
				}
			}
			if len(r.Own) > 0 && strings.HasPrefix(dep, Module) && !ownDep(strings.TrimPrefix(dep, Module), r.Own) {
				t.Errorf("%s depends on %s", pkg, dep)
			}
		}
	}
}

func ownDep(rel string, own []string) bool {
	for _, o := range own {
		if rel == o || strings.HasPrefix(rel, o+"/") {
			return true
		}
	}
	return false
}
