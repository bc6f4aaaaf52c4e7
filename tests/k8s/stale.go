package k8s

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
	"syscall"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/meshcrypt/meshcrypt/tests/internal/owner"
)

// Files in a cluster's directory.
const (
	ownerFile  = "owner"
	sysctlFile = "sysctls"
)

// staleGrace protects a directory whose owner file is not written yet (a Start in progress).
const staleGrace = time.Minute

// writeOwner records this process as dir's owner (tests/internal/owner).
func writeOwner(dir string) error { return owner.Write(dir, ownerFile) }

// ownerAlive reports whether the process recorded in dir's owner file still runs (a directory
// without one counts as alive while younger than staleGrace).
func ownerAlive(dir string) bool { return owner.Alive(dir, ownerFile, staleGrace) }

// CleanupStale removes what killed runs left behind, for every cluster directory
// (os.TempDir()/DirPrefix*) whose owner process has died: the processes of its nodes' cgroups
// (pods), every process whose command line names the directory (containerd, shims, kubelets,
// kube-proxies, controllers), its mount namespaces, cgroups and root-namespace veth, the sysctls
// its kubelets changed, and the directory. Clusters of live owners are never touched. Their
// network namespaces are netenv's (netenv.CleanupStale), their control planes
// controlplane.CleanupStale's. A nil logger discards.
func CleanupStale(ctx context.Context, log *slog.Logger) error {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	dirs, err := filepath.Glob(filepath.Join(os.TempDir(), DirPrefix+"*"))
	if err != nil {
		return fmt.Errorf("cleanup stale clusters: %w", err)
	}
	var errs []error
	for _, dir := range dirs {
		if ownerAlive(dir) {
			continue
		}
		log.Info("cleaning up stale cluster", "dir", dir)
		id := strings.TrimPrefix(filepath.Base(dir), DirPrefix)
		if hs, err := cgroupHierarchies(); err == nil {
			seen := map[string]bool{}
			for _, h := range hs {
				cgs, _ := filepath.Glob(filepath.Join(h, cgroupPrefix(id)+"*"))
				for _, cg := range cgs {
					if name := filepath.Base(cg); !seen[name] {
						seen[name] = true
						errs = append(errs, killCgroup(ctx, name))
					}
				}
			}
		}
		errs = append(errs, killMentioning(ctx, dir))
		if b, err := os.ReadFile(filepath.Join(dir, sysctlFile)); err == nil {
			for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
				if k, v, ok := strings.Cut(l, "="); ok {
					_ = os.WriteFile("/proc/sys/"+strings.ReplaceAll(k, ".", "/"), []byte(v), 0o644)
				}
			}
		}
		mnts, _ := filepath.Glob(filepath.Join(dir, "mnt", "*"))
		for _, m := range mnts {
			_ = syscall.Unmount(m, syscall.MNT_DETACH)
		}
		if len(id) >= 5 {
			if l, err := netlink.LinkByName(rootVeth(id)); err == nil {
				errs = append(errs, netlink.LinkDel(l))
			}
		}
		errs = append(errs, removeDir(ctx, dir))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("cleanup stale clusters: %w", err)
	}
	return nil
}

// killMentioning sends SIGKILL to every process whose command line names path or a path below
// it, and waits (bounded by ctx) until they are gone.
func killMentioning(ctx context.Context, path string) error {
	path = filepath.Clean(path)
	for {
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
			b, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
			if err != nil || !mentions(b, path) || zombie(pid) {
				continue
			}
			pids = append(pids, pid)
		}
		if len(pids) == 0 {
			return nil
		}
		for _, pid := range pids {
			_ = killPid(pid)
		}
		if err := sleepCtx(ctx, 50*time.Millisecond); err != nil {
			return fmt.Errorf("kill processes naming %s: %v left: %w", path, pids, err)
		}
	}
}

// mentions reports whether a NUL-separated command line has an argument naming path or a path
// below it (also inside a flag: --config=PATH/x).
func mentions(cmdline []byte, path string) bool {
	p := []byte(path)
	for _, arg := range bytes.Split(cmdline, []byte{0}) {
		for rest := arg; ; {
			i := bytes.Index(rest, p)
			if i < 0 {
				break
			}
			rest = rest[i+len(p):]
			if len(rest) == 0 || rest[0] == '/' || rest[0] == '.' {
				return true
			}
		}
	}
	return false
}

// zombie reports whether pid has exited and waits for its parent.
func zombie(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return true
	}
	i := bytes.LastIndexByte(b, ')')
	return i >= 0 && i+2 < len(b) && b[i+2] == 'Z'
}

func killPid(pid int) error {
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("kill %d: %w", pid, err)
	}
	return nil
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// Dir returns the cluster's directory (os.TempDir()/meshcrypt-k8s-*). Close removes it.
func (c *Cluster) Dir() string { return c.dir }

// Leftovers lists what remains on this machine of the cluster whose directory is dir: the
// directory, processes naming it or in its cgroups, its cgroups, mounts, network namespaces
// and root-namespace veth. After Close (or CleanupStale of a killed run) it is empty.
func Leftovers(dir string) []string {
	var out []string
	id := strings.TrimPrefix(filepath.Base(dir), DirPrefix)
	if _, err := os.Stat(dir); err == nil {
		out = append(out, "directory "+dir)
	}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() || zombie(pid) {
			continue
		}
		cmdline, _ := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		cg, _ := os.ReadFile("/proc/" + e.Name() + "/cgroup")
		if mentions(cmdline, dir) || bytes.Contains(cg, []byte("/"+cgroupPrefix(id))) {
			out = append(out, fmt.Sprintf("process %d (%s)", pid, bytes.ReplaceAll(bytes.TrimRight(cmdline, "\x00"), []byte{0}, []byte{' '})))
		}
	}
	if hs, err := cgroupHierarchies(); err == nil {
		for _, h := range hs {
			cgs, _ := filepath.Glob(filepath.Join(h, cgroupPrefix(id)+"*"))
			for _, cg := range cgs {
				out = append(out, "cgroup "+cg)
			}
		}
	}
	if mi, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
		for _, l := range strings.Split(string(mi), "\n") {
			if strings.Contains(l, dir) {
				out = append(out, "mount "+l)
			}
		}
	}
	if len(id) >= 5 {
		ns, _ := filepath.Glob(filepath.Join("/run/netns", netnsPrefix(id)+"-*"))
		for _, n := range ns {
			out = append(out, "netns "+n)
		}
		if _, err := netlink.LinkByName(rootVeth(id)); err == nil {
			out = append(out, "veth "+rootVeth(id))
		}
	}
	return out
}
