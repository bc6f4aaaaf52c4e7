package controlplane

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/meshcrypt/meshcrypt/tests/internal/owner"
)

// staleGrace protects a directory whose owner file is not written yet (a Start in progress).
const staleGrace = time.Minute

// writeOwner records this process as dir's owner (tests/internal/owner).
func writeOwner(dir string) error { return owner.Write(dir, ownerFile) }

// ownerAlive reports whether the process recorded in dir's owner file still runs (a directory
// without one counts as alive while younger than staleGrace).
func ownerAlive(dir string) bool { return owner.Alive(dir, ownerFile, staleGrace) }

// CleanupStale removes the control-plane directories (DirPrefix*) under parent ("" means
// os.TempDir()) whose owning process has died, after killing (SIGKILL) every process whose
// command line points into them: leftovers of a test binary that was killed before Stop. It
// never touches a directory whose owner still runs. It returns the first error but keeps going.
func CleanupStale(parent string) error {
	if parent == "" {
		parent = os.TempDir()
	}
	dirs, err := filepath.Glob(filepath.Join(parent, DirPrefix+"*"))
	if err != nil {
		return fmt.Errorf("cleanup stale control planes: %w", err)
	}
	var errs []error
	for _, dir := range dirs {
		if ownerAlive(dir) {
			continue
		}
		if err := killUnder(dir); err != nil {
			errs = append(errs, err)
		}
		if err := os.RemoveAll(dir); err != nil {
			errs = append(errs, fmt.Errorf("remove %s: %w", dir, err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("cleanup stale control planes: %w", err)
	}
	return nil
}

// killUnder sends SIGKILL to every process whose command line mentions dir and waits (up to
// 5 s) until they are gone.
func killUnder(dir string) error {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return fmt.Errorf("list processes: %w", err)
	}
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		cmdline, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err != nil || !mentionsDir(cmdline, dir) {
			continue // gone, a kernel thread, or not ours
		}
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
			return fmt.Errorf("kill %d: %w", pid, err)
		}
		pids = append(pids, pid)
	}
	deadline := time.Now().Add(5 * time.Second)
	for _, pid := range pids {
		for processExists(pid) {
			if time.Now().After(deadline) {
				return fmt.Errorf("process %d still runs after SIGKILL", pid)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return nil
}

// processExists reports whether pid names a live process (a zombie counts as gone: it only
// waits for its parent to reap it).
func processExists(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(b, ')')
	return i < 0 || i+2 >= len(b) || b[i+2] != 'Z'
}

// mentionsDir reports whether a NUL-separated command line has an argument naming dir or a path
// below it.
func mentionsDir(cmdline []byte, dir string) bool {
	d := []byte(filepath.Clean(dir))
	for _, arg := range bytes.Split(cmdline, []byte{0}) {
		for rest := arg; ; {
			i := bytes.Index(rest, d)
			if i < 0 {
				break
			}
			rest = rest[i+len(d):]
			if len(rest) == 0 || rest[0] == '/' {
				return true
			}
		}
	}
	return false
}
