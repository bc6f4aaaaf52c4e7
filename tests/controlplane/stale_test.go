package controlplane

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

func TestCleanupStale(t *testing.T) {
	parent := t.TempDir()
	mkdir := func(t *testing.T) string {
		t.Helper()
		d, err := os.MkdirTemp(parent, DirPrefix)
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	writeFile := func(t *testing.T, path, s string) {
		t.Helper()
		if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}

	// Our own pid with a start time that is not ours: a dead owner whose pid was reused.
	stale := mkdir(t)
	writeFile(t, filepath.Join(stale, ownerFile), fmt.Sprintf("%d 1\n", os.Getpid()))
	writeFile(t, filepath.Join(stale, etcdLogFile), "")
	leftover := exec.Command("tail", "-f", "/dev/null", filepath.Join(stale, etcdLogFile))
	leftover.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := leftover.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = leftover.Process.Kill(); _ = leftover.Wait() })
	// Start returns once exec has begun, but the new program's argv is mapped a moment later:
	// until then /proc/<pid>/cmdline reads empty. Wait until the leftover shows its command
	// line, as a real leftover would.
	cmdlineDeadline := time.Now().Add(5 * time.Second)
	for {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", leftover.Process.Pid))
		if mentionsDir(b, stale) {
			break
		}
		if time.Now().After(cmdlineDeadline) {
			t.Fatalf("leftover's command line never showed %s", stale)
		}
		time.Sleep(5 * time.Millisecond)
	}

	live := mkdir(t)
	if err := writeOwner(live); err != nil {
		t.Fatal(err)
	}
	starting := mkdir(t) // no owner file yet, just created: a Start in progress
	abandoned := mkdir(t)
	old := time.Now().Add(-2 * staleGrace)
	if err := os.Chtimes(abandoned, old, old); err != nil {
		t.Fatal(err)
	}
	other := filepath.Join(parent, "unrelated")
	if err := os.Mkdir(other, 0o700); err != nil {
		t.Fatal(err)
	}

	if err := CleanupStale(parent); err != nil {
		t.Fatal(err)
	}

	for _, tt := range []struct {
		dir      string
		wantGone bool
	}{
		{stale, true},
		{abandoned, true},
		{live, false},
		{starting, false},
		{other, false},
	} {
		_, err := os.Stat(tt.dir)
		if gone := errors.Is(err, os.ErrNotExist); gone != tt.wantGone {
			t.Errorf("%s: gone = %v, want %v (stat: %v)", filepath.Base(tt.dir), gone, tt.wantGone, err)
		}
	}
	done := make(chan error, 1)
	go func() { done <- leftover.Wait() }()
	select {
	case err := <-done:
		if ws, ok := leftover.ProcessState.Sys().(syscall.WaitStatus); !ok || ws.Signal() != syscall.SIGKILL {
			t.Errorf("leftover process ended with %v, want SIGKILL", err)
		}
	case <-time.After(5 * time.Second):
		t.Error("leftover process still runs after CleanupStale")
	}
}

func TestMentionsDir(t *testing.T) {
	const dir = "/tmp/meshcrypt-cp-1"
	tests := []struct {
		name string
		args []string
		want bool
	}{
		{"flag value below dir", []string{"etcd", "--data-dir=/tmp/meshcrypt-cp-1/etcd"}, true},
		{"dir itself", []string{"tail", "/tmp/meshcrypt-cp-1"}, true},
		{"longer sibling", []string{"etcd", "--data-dir=/tmp/meshcrypt-cp-12/etcd"}, false},
		{"sibling then dir", []string{"x", "/tmp/meshcrypt-cp-12:/tmp/meshcrypt-cp-1/a"}, true},
		{"unrelated", []string{"sleep", "60"}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cmdline := []byte(strings.Join(tt.args, "\x00") + "\x00")
			if got := mentionsDir(cmdline, dir); got != tt.want {
				t.Errorf("mentionsDir(%q) = %v, want %v", tt.args, got, tt.want)
			}
		})
	}
}
