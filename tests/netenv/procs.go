package netenv

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// nsID identifies a network namespace: the device and inode of its nsfs file.
type nsID struct{ dev, ino uint64 }

// statNS returns the identity of the namespace file at path (a /run/netns bind
// mount or a /proc/<pid>/ns/net link).
func statNS(path string) (nsID, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return nsID{}, err
	}
	return nsID{dev: st.Dev, ino: st.Ino}, nil
}

// pidsIn returns the processes (other than this one) whose network namespace is
// one of ids, like `ip netns pids`.
func pidsIn(ids map[nsID]bool) ([]int, error) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, fmt.Errorf("list /proc: %w", err)
	}
	self := os.Getpid()
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		id, err := statNS(filepath.Join("/proc", e.Name(), "ns", "net"))
		if err != nil {
			continue // gone, a zombie or a kernel thread
		}
		if ids[id] {
			pids = append(pids, pid)
		}
	}
	return pids, nil
}

// killIn sends SIGKILL to every process in the namespaces at paths and waits
// until none is left in them or ctx is done. Missing paths are skipped.
func killIn(ctx context.Context, paths ...string) error {
	ids := map[nsID]bool{}
	for _, p := range paths {
		id, err := statNS(p)
		if err != nil {
			continue
		}
		// An unmounted leftover file is a plain file on the same fs as its
		// siblings, not a namespace: only nsfs inodes identify namespaces.
		var fs unix.Statfs_t
		if unix.Statfs(p, &fs) == nil && fs.Type == unix.NSFS_MAGIC {
			ids[id] = true
		}
	}
	if len(ids) == 0 {
		return nil
	}
	for {
		pids, err := pidsIn(ids)
		if err != nil {
			return err
		}
		if len(pids) == 0 {
			return nil
		}
		for _, pid := range pids {
			if err := unix.Kill(pid, unix.SIGKILL); err != nil && !errors.Is(err, unix.ESRCH) {
				return fmt.Errorf("kill pid %d: %w", pid, err)
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("kill processes in %s: pids %v still alive: %w", strings.Join(paths, " "), pids, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}
