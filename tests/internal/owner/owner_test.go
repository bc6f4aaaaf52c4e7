package owner

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestAlive(t *testing.T) {
	live := t.TempDir()
	if err := Write(live, "owner"); err != nil {
		t.Fatal(err)
	}
	if !Alive(live, "owner", time.Minute) {
		t.Error("this process's directory is not alive")
	}
	// The same pid with another start time is a process that reused it: dead.
	dead := t.TempDir()
	if err := os.WriteFile(filepath.Join(dead, "owner"), []byte("1 1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if Alive(dead, "owner", time.Minute) {
		t.Error("pid 1 with start time 1 counts as alive")
	}
	// No owner file yet: alive while young, dead once older than the grace.
	young := t.TempDir()
	if !Alive(young, "owner", time.Minute) {
		t.Error("a fresh directory without an owner file is not alive")
	}
	old := time.Now().Add(-2 * time.Minute)
	if err := os.Chtimes(young, old, old); err != nil {
		t.Fatal(err)
	}
	if Alive(young, "owner", time.Minute) {
		t.Error("an old directory without an owner file counts as alive")
	}
	if _, err := ProcStart(-1); err == nil {
		t.Error("ProcStart(-1) did not fail")
	}
}
