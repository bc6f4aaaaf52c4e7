// Command cleanup removes what a killed test run left behind: network namespaces of test
// topologies whose owner process is gone (with every process inside them: agents, userspace
// WireGuard devices) and control planes (etcd, kube-apiserver) of dead owners. `make test`
// runs it before and after the suites, so a failing or timed-out run leaves nothing behind.
package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/meshcrypt/meshcrypt/tests/controlplane"
	"github.com/meshcrypt/meshcrypt/tests/netenv"
)

func main() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	removed, err := netenv.CleanupStale(ctx, log)
	if len(removed) > 0 {
		fmt.Fprintf(os.Stderr, "cleanup: removed stale namespaces %v\n", removed)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "cleanup: namespaces:", err)
	}
	if err := controlplane.CleanupStale(""); err != nil {
		fmt.Fprintln(os.Stderr, "cleanup: control planes:", err)
	}
}
