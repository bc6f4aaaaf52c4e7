// Command cleanup removes what a killed test run left behind: network namespaces of test
// topologies whose owner process is gone (with every process inside them: agents, userspace
// WireGuard devices), real clusters (tests/k8s: containerd, kubelets, pods, mount namespaces,
// cgroups) and control planes (etcd, kube-apiserver) of dead owners. `make test`
// runs it before and after the suites, so a failing or timed-out run leaves nothing behind.
package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/meshcrypt/meshcrypt/tests/cluster"
	"github.com/meshcrypt/meshcrypt/tests/controlplane"
	"github.com/meshcrypt/meshcrypt/tests/k8s"
	"github.com/meshcrypt/meshcrypt/tests/netenv"
	"github.com/meshcrypt/meshcrypt/tests/vm"
)

func main() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	// Real clusters first: their pods' processes live in no namespace netenv knows, and their
	// mount namespaces and cgroups outlive the network namespaces.
	if err := k8s.CleanupStale(ctx, log); err != nil {
		fmt.Fprintln(os.Stderr, "cleanup: k8s clusters:", err)
	}
	removed, err := netenv.CleanupStale(ctx, log)
	if len(removed) > 0 {
		fmt.Fprintf(os.Stderr, "cleanup: removed stale namespaces %v\n", removed)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "cleanup: namespaces:", err)
	}
	// A cluster's bpffs outlives it only when its run was killed: its namespaces are gone.
	dirs, _ := os.ReadDir(cluster.BPFRoot)
	for _, d := range dirs {
		if _, err := os.Stat(filepath.Join("/run/netns", d.Name()+"-sw")); err == nil {
			continue // still in use
		}
		if err := cluster.UnmountBPF(filepath.Join(cluster.BPFRoot, d.Name())); err != nil {
			fmt.Fprintln(os.Stderr, "cleanup: bpffs:", err)
		}
	}
	if err := vm.CleanupStale(); err != nil {
		fmt.Fprintln(os.Stderr, "cleanup: vm:", err)
	}
	if err := controlplane.CleanupStale(""); err != nil {
		fmt.Fprintln(os.Stderr, "cleanup: control planes:", err)
	}
}
