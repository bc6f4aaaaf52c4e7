package controlplane

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// staleGrace protects a directory whose owner file is not written yet (a Start in progress).
const staleGrace = time.Minute

// writeOwner records the current process (pid and start time, which tells a reused pid apart)
// as the directory's owner.
func writeOwner(dir string) error {
	start, err := procStartTime(os.Getpid())
	if err != nil {
		return fmt.Errorf("write owner: %w", err)
	}
	b := fmt.Appendf(nil, "%d %d\n", os.Getpid(), start)
	if err := os.WriteFile(filepath.Join(dir, ownerFile), b, 0o600); err != nil {
		return fmt.Errorf("write owner: %w", err)
	}
	return nil
}

// procStartTime returns field 22 of /proc/PID/stat, the process's start time in clock ticks
// since boot.
func procStartTime(pid int) (uint64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	// The command name (field 2) is in parentheses and may hold spaces; fields after the last
	// ')' start with field 3.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("parse /proc/%d/stat: no ')'", pid)
	}
	fields := strings.Fields(string(b[i+1:]))
	if len(fields) < 20 {
		return 0, fmt.Errorf("parse /proc/%d/stat: %d fields", pid, len(fields))
	}
	return strconv.ParseUint(fields[19], 10, 64)
}

// ownerAlive reports whether the process recorded in dir's owner file still runs. A directory
// without a readable owner file counts as alive while it is younger than staleGrace.
func ownerAlive(dir string) bool {
	b, err := os.ReadFile(filepath.Join(dir, ownerFile))
	if err != nil {
		st, err := os.Stat(dir)
		return err == nil && time.Since(st.ModTime()) < staleGrace
	}
	var pid int
	var start uint64
	if _, err := fmt.Sscanf(string(b), "%d %d", &pid, &start); err != nil || pid <= 0 {
		return false
	}
	got, err := procStartTime(pid)
	return err == nil && got == start
}

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
