package cluster

import (
	"context"
	"strings"
	"testing"
)

// TestStartFailsCleanly: a Start that fails part-way (here: the binaries are missing) returns
// the error and cleans up, rather than crashing on its own cleanup.
func TestStartFailsCleanly(t *testing.T) {
	_, err := Start(context.Background(), Options{BinDir: t.TempDir()})
	if err == nil || !strings.Contains(err.Error(), "meshcrypt-agent") {
		t.Fatalf("Start with an empty bin dir: err = %v, want the missing binary named", err)
	}
}
