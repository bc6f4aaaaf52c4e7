package k8s

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestCleanupStaleOwners checks that CleanupStale removes the directory of a dead owner, killing
// a process that names it, and leaves a live owner's directory and its process alone.
func TestCleanupStaleOwners(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("CleanupStale kills processes and unmounts: needs root")
	}
	mkdir := func(t *testing.T) string {
		t.Helper()
		d, err := os.MkdirTemp("", DirPrefix+"unit")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(d) })
		return d
	}
	leftover := func(t *testing.T, dir string) *exec.Cmd {
		t.Helper()
		f := filepath.Join(dir, "containerd.toml")
		if err := os.WriteFile(f, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command("tail", "-f", "/dev/null", f)
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
		// The command line shows once exec has mapped the new program.
		for deadline := time.Now().Add(5 * time.Second); ; {
			b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", cmd.Process.Pid))
			if mentions(b, dir) {
				return cmd
			}
			if time.Now().After(deadline) {
				t.Fatalf("leftover's command line never showed %s", dir)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	dead := mkdir(t)
	// Our pid with a start time that is not ours: a dead owner whose pid was reused.
	if err := os.WriteFile(filepath.Join(dead, ownerFile), fmt.Appendf(nil, "%d 1\n", os.Getpid()), 0o600); err != nil {
		t.Fatal(err)
	}
	deadProc := leftover(t, dead)
	live := mkdir(t)
	if err := writeOwner(live); err != nil {
		t.Fatal(err)
	}
	liveProc := leftover(t, live)

	if err := CleanupStale(t.Context(), nil); err != nil {
		t.Errorf("CleanupStale: %v", err)
	}
	if _, err := os.Stat(dead); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("dead owner's directory still there (stat: %v)", err)
	}
	if _, err := os.Stat(live); err != nil {
		t.Errorf("live owner's directory removed: %v", err)
	}
	done := make(chan struct{})
	go func() { _ = deadProc.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Error("the dead owner's leftover process still runs")
	}
	if err := syscall.Kill(liveProc.Process.Pid, 0); err != nil {
		t.Errorf("the live owner's process was killed: %v", err)
	}
}

func TestMentions(t *testing.T) {
	const dir = "/tmp/meshcrypt-k8s-1"
	for _, tt := range []struct {
		args []string
		want bool
	}{
		{[]string{"containerd", "--config", "/tmp/meshcrypt-k8s-1/nodes/a/containerd.toml"}, true},
		{[]string{"kubelet", "--config=/tmp/meshcrypt-k8s-1/nodes/a/kubelet.yaml"}, true},
		{[]string{"shim", "-address", "/tmp/meshcrypt-k8s-1/nodes/a/containerd.sock"}, true},
		{[]string{"kubelet", "--config=/tmp/meshcrypt-k8s-12/kubelet.yaml"}, false},
		{[]string{"sleep", "60"}, false},
	} {
		cmdline := []byte(strings.Join(tt.args, "\x00") + "\x00")
		if got := mentions(cmdline, dir); got != tt.want {
			t.Errorf("mentions(%q) = %v, want %v", tt.args, got, tt.want)
		}
	}
}
