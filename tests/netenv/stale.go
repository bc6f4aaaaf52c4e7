package netenv

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// StateDir holds one "<prefix>.pid" file per live topology, naming its owner.
const StateDir = "/run/meshcrypt-netenv"

// lockStateDir takes an exclusive flock on StateDir/.lock, serialising owner
// checks and /run/netns setup between processes. The caller runs the returned
// unlock.
func lockStateDir() (func(), error) {
	if err := os.MkdirAll(StateDir, 0o755); err != nil {
		return nil, fmt.Errorf("create %s: %w", StateDir, err)
	}
	f, err := os.OpenFile(filepath.Join(StateDir, ".lock"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open lock: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", f.Name(), err)
	}
	return func() { f.Close() }, nil
}

func pidFile(prefix string) string { return filepath.Join(StateDir, prefix+".pid") }

// owner identifies a process across pid reuse: pid and start time in clock ticks.
type owner struct {
	pid   int
	start uint64
}

func (o owner) String() string { return fmt.Sprintf("%d %d\n", o.pid, o.start) }

// processStart reads the start time of pid from /proc/<pid>/stat.
func processStart(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	return parseStatStart(b)
}

// parseStatStart extracts field 22 (starttime) of a /proc/<pid>/stat line. The
// command name, field 2, may hold spaces and parentheses, so fields are counted
// from the last ')'.
func parseStatStart(b []byte) (uint64, error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, errors.New("parse stat: no ')'")
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state), so field 22 is f[19].
	if len(f) < 20 {
		return 0, fmt.Errorf("parse stat: %d fields after the command", len(f))
	}
	v, err := strconv.ParseUint(f[19], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("parse stat starttime: %w", err)
	}
	return v, nil
}

func parseOwner(b []byte) (owner, error) {
	f := strings.Fields(string(b))
	if len(f) < 1 {
		return owner{}, errors.New("parse pid file: empty")
	}
	var o owner
	var err error
	if o.pid, err = strconv.Atoi(f[0]); err != nil || o.pid <= 0 {
		return o, fmt.Errorf("parse pid file: pid %q", f[0])
	}
	if len(f) > 1 {
		if o.start, err = strconv.ParseUint(f[1], 10, 64); err != nil {
			return o, fmt.Errorf("parse pid file: start %q", f[1])
		}
	}
	return o, nil
}

// alive reports whether the owner process still runs (same pid, same start
// time when the file recorded one).
func (o owner) alive() bool {
	start, err := processStart(o.pid)
	if err != nil {
		return false
	}
	return o.start == 0 || o.start == start
}

func selfOwner() (owner, error) {
	start, err := processStart(os.Getpid())
	if err != nil {
		return owner{}, fmt.Errorf("read own start time: %w", err)
	}
	return owner{pid: os.Getpid(), start: start}, nil
}

// claimPrefix writes the pid file of prefix for this process. A prefix whose
// owner is dead is cleaned up and taken over; a live one, or namespaces of the
// prefix without an owner, are an error. Runs under the state lock.
func claimPrefix(ctx context.Context, prefix string, log *slog.Logger) error {
	unlock, err := lockStateDir()
	if err != nil {
		return err
	}
	defer unlock()
	if b, err := os.ReadFile(pidFile(prefix)); err == nil {
		if o, err := parseOwner(b); err == nil && o.alive() {
			return fmt.Errorf("claim prefix %s: in use by pid %d", prefix, o.pid)
		}
		if _, err := cleanupPrefix(ctx, prefix, log); err != nil {
			return fmt.Errorf("claim prefix %s: %w", prefix, err)
		}
	}
	if names, err := listNamedNS(prefix); err != nil {
		return err
	} else if len(names) > 0 {
		return fmt.Errorf("claim prefix %s: namespaces without an owner exist: %s", prefix, strings.Join(names, " "))
	}
	me, err := selfOwner()
	if err != nil {
		return err
	}
	if err := os.WriteFile(pidFile(prefix), []byte(me.String()), 0o644); err != nil {
		return fmt.Errorf("claim prefix %s: %w", prefix, err)
	}
	return nil
}

// cleanupPrefix kills the processes in, and deletes, every namespace of prefix,
// then removes its pid file. It returns the namespaces deleted.
func cleanupPrefix(ctx context.Context, prefix string, log *slog.Logger) ([]string, error) {
	names, err := listNamedNS(prefix)
	if err != nil {
		return nil, err
	}
	paths := make([]string, len(names))
	for i, n := range names {
		paths[i] = filepath.Join(netnsDir, n)
	}
	if err := killIn(ctx, paths...); err != nil {
		return nil, err
	}
	var errs []error
	var deleted []string
	for _, n := range names {
		if err := deleteNamedNS(n); err != nil {
			errs = append(errs, err)
			continue
		}
		deleted = append(deleted, n)
		log.Debug("deleted netns", "netns", n)
	}
	if err := os.Remove(pidFile(prefix)); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("remove pid file: %w", err))
	}
	return deleted, errors.Join(errs...)
}

// CleanupStale deletes the namespaces of every topology whose owner process
// (recorded in StateDir) is dead, killing the processes inside them first, and
// returns the names of the namespaces it deleted. Topologies of live owners,
// and namespaces without a pid file, are never touched. Safe to run while other
// processes build topologies. A nil logger discards.
func CleanupStale(ctx context.Context, log *slog.Logger) ([]string, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ents, err := os.ReadDir(StateDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("cleanup stale: %w", err)
	}
	unlock, err := lockStateDir()
	if err != nil {
		return nil, fmt.Errorf("cleanup stale: %w", err)
	}
	defer unlock()
	var deleted []string
	var errs []error
	for _, e := range ents {
		prefix, ok := strings.CutSuffix(e.Name(), ".pid")
		if !ok || !prefixRE.MatchString(prefix) {
			continue
		}
		b, err := os.ReadFile(filepath.Join(StateDir, e.Name()))
		if err != nil {
			continue // removed meanwhile
		}
		if o, err := parseOwner(b); err == nil && o.alive() {
			continue
		}
		log.Info("cleaning up stale topology", "prefix", prefix)
		d, err := cleanupPrefix(ctx, prefix, log)
		deleted = append(deleted, d...)
		if err != nil {
			errs = append(errs, fmt.Errorf("cleanup stale %s: %w", prefix, err))
		}
	}
	return deleted, errors.Join(errs...)
}
