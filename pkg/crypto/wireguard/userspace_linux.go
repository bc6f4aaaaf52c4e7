//go:build linux

package wireguard

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"syscall"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// userspaceDevice is a wireguard-go device served by a RunDevice process.
type userspaceDevice struct{ *wgDevice }

// Backend implements Device.
func (d *userspaceDevice) Backend() Backend { return BackendUserspace }

// Delete implements Device: it stops the device process (SIGTERM, then
// SIGKILL after 5 s) and waits until the UAPI socket and the link are gone.
func (d *userspaceDevice) Delete(ctx context.Context) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.deleted {
		return nil
	}
	if err := d.usable(ctx); err != nil {
		return err
	}
	err := d.stop(ctx)
	if err == nil {
		d.deleted = true
		d.log.Info("deleted WireGuard device", logKeyBackend, BackendUserspace)
	}
	return errors.Join(err, d.closeLocked())
}

func (d *userspaceDevice) stop(ctx context.Context) error {
	pid, ok, err := probeUAPI(d.name)
	if err != nil {
		return fmt.Errorf("delete WireGuard device %s: %w", d.name, err)
	}
	if ok {
		if pid == os.Getpid() {
			return fmt.Errorf("delete WireGuard device %s: it is served by this process; cancel RunDevice instead", d.name)
		}
		stopped := false
		for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
			if err := syscall.Kill(pid, sig); err != nil && !errors.Is(err, syscall.ESRCH) {
				return fmt.Errorf("delete WireGuard device %s: signal pid %d: %w", d.name, pid, err)
			}
			if err := waitExit(ctx, pid, 5*time.Second); err == nil {
				stopped = true
				break
			} else if ctx.Err() != nil {
				return fmt.Errorf("delete WireGuard device %s: %w", d.name, err)
			}
			d.log.Warn("userspace device did not stop", logKeyPID, pid, "signal", sig.String())
		}
		if !stopped {
			return fmt.Errorf("delete WireGuard device %s: process %d survives SIGKILL", d.name, pid)
		}
	}
	// A killed process leaves its socket file behind. Its TUN link went
	// with its file descriptor; remove a leftover one all the same.
	if err := os.Remove(UAPISocketPath(d.name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("delete WireGuard device %s: %w", d.name, err)
	}
	if err := d.waitGone(ctx, time.Second); err != nil {
		l, lerr := d.link()
		if lerr == nil && l != nil {
			lerr = d.nl.LinkDel(l)
		}
		if lerr != nil {
			return fmt.Errorf("delete WireGuard device %s: %w", d.name, lerr)
		}
	}
	return nil
}

// waitExit polls until process pid has exited (it no longer exists or is a
// zombie waiting for its parent), for at most timeout.
func waitExit(ctx context.Context, pid int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		if processGone(pid) {
			return nil
		}
		if !time.Now().Before(deadline) {
			return fmt.Errorf("process %d still running after %s", pid, timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// processGone reports whether pid has fully exited: it does not exist, or
// it is a zombie none of whose threads still runs. (A thread group leader
// turns zombie while other threads may still be exiting and holding the
// process's sockets.)
func processGone(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ESRCH)
	}
	// Format: pid (comm) state ...; comm may contain spaces and parentheses.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) || b[i+2] != 'Z' {
		return false
	}
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ESRCH)
	}
	return len(tasks) <= 1
}

// waitGone polls until neither the UAPI socket answers nor the link exists,
// for at most timeout (0: check once).
func (d *wgDevice) waitGone(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		_, ok, err := probeUAPI(d.name)
		if err != nil {
			return err
		}
		l, err := d.link()
		if err != nil {
			return err
		}
		if !ok && l == nil {
			return nil
		}
		if !time.Now().Before(deadline) {
			return fmt.Errorf("device still present after %s (socket answers: %t, link exists: %t)", timeout, ok, l != nil)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// checkUserspace checks that wgctrl reaches the device and that it is
// userspace.
func (d *wgDevice) checkUserspace() error {
	dev, err := d.wg.Device(d.name)
	if err != nil {
		return fmt.Errorf("read device through wgctrl: %w", err)
	}
	if dev.Type != wgtypes.Userspace {
		return fmt.Errorf("wgctrl reports a %s device, want userspace", dev.Type)
	}
	return nil
}

// startUserspace starts opts.DeviceCommand detached in opts.NetNS and waits
// until the device answers on its UAPI socket and its link exists in d's
// namespace. On failure the process is killed and the error carries the
// tail of its log.
func (d *wgDevice) startUserspace(ctx context.Context, opts EnsureOptions) (pid int, err error) {
	if len(opts.DeviceCommand) == 0 {
		return 0, errors.New("start userspace device: no DeviceCommand given")
	}
	devNull, err := os.Open(os.DevNull)
	if err != nil {
		return 0, fmt.Errorf("start userspace device: %w", err)
	}
	defer devNull.Close()
	out := devNull
	if opts.LogPath != "" {
		out, err = os.OpenFile(opts.LogPath, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
		if err != nil {
			return 0, fmt.Errorf("start userspace device: open log: %w", err)
		}
		defer out.Close()
	}
	cmd := exec.Command(opts.DeviceCommand[0], opts.DeviceCommand[1:]...)
	cmd.Stdin = devNull
	cmd.Stdout = out
	cmd.Stderr = out
	cmd.Dir = "/"
	// Own session: no signals from the caller's terminal or process group.
	// No Pdeathsig: the device must outlive the agent.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	// The child inherits the namespaces of the OS thread that forks it.
	if err := inNetNS(opts.NetNS, cmd.Start); err != nil {
		return 0, fmt.Errorf("start userspace device %q: %w", opts.DeviceCommand, err)
	}
	pid = cmd.Process.Pid
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }() // reaps the child if it dies while we run

	timeout := opts.StartTimeout
	if timeout <= 0 {
		timeout = DefaultStartTimeout
	}
	fail := func(err error) (int, error) {
		if kerr := cmd.Process.Kill(); kerr == nil {
			select {
			case <-exited:
			case <-time.After(2 * time.Second):
			}
		}
		return 0, fmt.Errorf("start userspace device (pid %d): %w%s", pid, err, logTail(opts.LogPath))
	}
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	linkMissing := false
	for {
		select {
		case err := <-exited:
			if err == nil {
				err = errors.New("exit status 0")
			}
			return 0, fmt.Errorf("start userspace device (pid %d): exited before answering: %w%s", pid, err, logTail(opts.LogPath))
		case <-ctx.Done():
			return fail(ctx.Err())
		case <-deadline.C:
			if linkMissing {
				return fail(fmt.Errorf("device answers on %s but its link is not in this network namespace (is NetNS the namespace of the netlink handle?)", UAPISocketPath(d.name)))
			}
			return fail(fmt.Errorf("no answer on %s within %s", UAPISocketPath(d.name), timeout))
		case <-tick.C:
		}
		spid, ok, err := probeUAPI(d.name)
		if err != nil || !ok {
			continue
		}
		if spid != pid {
			// A wrapper in DeviceCommand that forks, or a concurrent Ensure
			// that won the name (ours then exits, unable to listen).
			d.log.Warn("userspace device answers from another pid than started", logKeyPID, spid, "started_pid", pid)
		}
		l, err := d.link()
		if err != nil {
			return fail(err)
		}
		if l == nil {
			// RunDevice claims its socket before it creates the TUN interface (so a name
			// clash fails early), and the socket accepts connections from then on: the link
			// may simply not exist yet. Wait for it until the deadline.
			linkMissing = true
			continue
		}
		if err := d.checkUserspace(); err != nil {
			return fail(err)
		}
		return spid, nil
	}
}

// logTail returns the last lines of the log at path, formatted to append to
// an error, or "" if there is nothing to show.
func logTail(path string) string {
	if path == "" {
		return " (no LogPath: output discarded)"
	}
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	const max = 2048
	if fi, err := f.Stat(); err == nil && fi.Size() > max {
		if _, err := f.Seek(-max, io.SeekEnd); err != nil {
			return ""
		}
	}
	b, err := io.ReadAll(f)
	if err != nil {
		return ""
	}
	b = bytes.TrimSpace(b)
	if len(b) == 0 {
		return ""
	}
	return fmt.Sprintf("; log %s ends:\n%s", path, b)
}
