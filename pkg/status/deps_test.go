package status

import (
	"testing"

	"github.com/meshcrypt/meshcrypt/internal/deptest"
)

// TestDependencies: the report is computed from values; talking to the API server is the
// CLI's job.
func TestDependencies(t *testing.T) {
	deptest.Check(t, deptest.Rules{
		Packages: []string{"."},
		Banned:   []string{"k8s.io/client-go", "sigs.k8s.io/controller-runtime", "github.com/cilium/ebpf"},
	})
}
