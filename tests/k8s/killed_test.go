package k8s_test

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meshcrypt/meshcrypt/tests/controlplane"
	"github.com/meshcrypt/meshcrypt/tests/k8s"
	"github.com/meshcrypt/meshcrypt/tests/netenv"
)

// envChild makes TestKilledRunCleanup, in the child it starts, be that child (killedRunChild).
const envChild = "MESHCRYPT_K8S_KILLED_CHILD"

// TestKilledRunCleanup starts a cluster with a running pod in a child process, kills the child
// with SIGKILL (as a timed-out or interrupted `go test` is), and checks that the stale cleanups
// `make test` runs (tests/cleanup: k8s, netenv and controlplane CleanupStale) leave nothing of
// it: no process (containerd shims and containers survive their parent), cgroup, mount,
// namespace, veth or directory.
func TestKilledRunCleanup(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	if os.Getenv(envChild) != "" {
		killedRunChild(t)
		return
	}
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestKilledRunCleanup$", "-test.v")
	cmd.Env = append(os.Environ(), envChild+"=1")
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	dir := ""
	sc := bufio.NewScanner(out)
	var lines []string
	for sc.Scan() {
		l := sc.Text()
		lines = append(lines, l)
		if d, ok := strings.CutPrefix(strings.TrimSpace(l), "CLUSTER-DIR "); ok {
			dir = d
			break
		}
	}
	if dir == "" {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		t.Fatalf("child did not bring its cluster up:\n%s", strings.Join(lines, "\n"))
	}
	go func() { // keep the pipe drained until the child dies
		for sc.Scan() {
		}
	}()
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()
	if len(k8s.Leftovers(dir)) == 0 {
		t.Fatal("the killed run left nothing behind to clean up: the test proves nothing")
	}
	if err := k8s.CleanupStale(ctx, nil); err != nil {
		t.Errorf("k8s.CleanupStale: %v", err)
	}
	if _, err := netenv.CleanupStale(ctx, nil); err != nil {
		t.Errorf("netenv.CleanupStale: %v", err)
	}
	if err := controlplane.CleanupStale(""); err != nil {
		t.Errorf("controlplane.CleanupStale: %v", err)
	}
	checkNothingLeft(t, dir)
}

// killedRunChild is TestKilledRunCleanup's child: it starts a cluster with a pod, prints the
// cluster's directory and waits to be killed.
func killedRunChild(t *testing.T) {
	c, err := k8s.Start(t.Context(), k8s.Options{})
	if err != nil {
		t.Fatal(err)
	}
	startEchoPod(t, c, "leftover", c.Nodes[0].Name)
	fmt.Printf("CLUSTER-DIR %s\n", c.Dir())
	time.Sleep(5 * time.Minute) // killed long before
	t.Fatal("not killed")
}
