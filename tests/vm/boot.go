package vm

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// DefaultBootTimeout bounds one boot, tests included.
const DefaultBootTimeout = 10 * time.Minute

// BootOptions say how to run the VM.
type BootOptions struct {
	// Memory is the guest's RAM in MiB; 0 means 1024. The initramfs stays in
	// RAM (a tmpfs), test binaries and their temporary files too.
	Memory int
	// CPUs is the number of virtual CPUs; 0 means 2.
	CPUs int
	// Timeout bounds the boot; 0 means DefaultBootTimeout.
	Timeout time.Duration
	// Network gives the guest a virtio NIC on qemu's user network: eth0 is
	// 10.0.2.15/24 and HostAddr (10.0.2.2) is the host's loopback, so the
	// guest reaches a server listening on the host's 127.0.0.1:PORT at
	// 10.0.2.2:PORT. The guest gets no default route: nothing beyond the
	// host is reachable.
	Network bool
	// Files are added to the guest at boot, without rebuilding the image
	// (an extra cpio archive appended to the initramfs): a kubeconfig for a
	// control plane that started after Build, say.
	Files []File
	// Env is exported to the test binaries.
	Env map[string]string
	// Progress receives a line per boot event (booted, a binary started or
	// ended, a test failed) as it happens; nil discards.
	Progress io.Writer
	// Transcript receives the results port (ttyS1) verbatim, for the
	// record; nil discards. ParseResults reads it back.
	Transcript io.Writer
	// Console receives the kernel console as it happens; nil discards.
	// Result.Console keeps its tail either way.
	Console io.Writer
	// QEMU is the emulator; "" means qemu-system-x86_64 from PATH.
	QEMU string
	// Append is added to the kernel command line.
	Append string
}

// consoleTail is how much of the kernel console Result keeps.
const consoleTail = 64 << 10

// Boot runs the image in qemu (TCG: KVM does not work on the build
// machines) and returns what the guest reported. qemu runs in its own
// process group, is killed when ctx ends or the timeout passes, and dies
// with the calling process (Pdeathsig). A failed boot is described by
// Result.Err; the error return is for failures before qemu started.
func Boot(ctx context.Context, img *Image, opts BootOptions) (*Result, error) {
	timeout := cmp.Or(opts.Timeout, DefaultBootTimeout)
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	nonce := make([]byte, 8)
	rand.Read(nonce)
	res := &Result{order: img.Tests, specs: img.specs, Nonce: hex.EncodeToString(nonce)}

	dir, err := ownedTempDir("meshcrypt-vm-boot-*")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	initrd := img.Initrd
	if len(opts.Files) > 0 || len(opts.Env) > 0 {
		if initrd, err = bootInitrd(img.Initrd, filepath.Join(dir, "initrd"), opts); err != nil {
			return nil, err
		}
	}
	args := qemuArgs(img.Kernel.Image(), initrd, res.Nonce, opts)
	qemu := opts.QEMU
	if qemu == "" {
		qemu = "qemu-system-x86_64"
	}
	if _, err := exec.LookPath(qemu); err != nil {
		return nil, fmt.Errorf("%s (Debian package qemu-system-x86; run hack/vm-deps.sh): %w", qemu, err)
	}

	conR, conW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	resR, resW, err := os.Pipe()
	if err != nil {
		conR.Close()
		conW.Close()
		return nil, err
	}
	cmd := exec.Command(qemu, args...)
	var stderr tailBuffer
	stderr.max = 16 << 10
	cmd.Stdout, cmd.Stderr = &stderr, &stderr
	cmd.ExtraFiles = []*os.File{conW, resW} // fds 3 and 4 in qemu
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}

	start := time.Now()
	waitErr := make(chan error, 1)
	startErr := make(chan error, 1)
	// Pdeathsig fires when the thread that forked qemu exits, not the
	// process: fork from a goroutine locked to its thread that lives until
	// qemu is reaped.
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			startErr <- err
			return
		}
		startErr <- nil
		waitErr <- cmd.Wait()
	}()
	err = <-startErr
	conW.Close()
	resW.Close()
	if err != nil {
		conR.Close()
		resR.Close()
		return nil, fmt.Errorf("start %s: %w", qemu, err)
	}

	var (
		wg      sync.WaitGroup
		console = &tailBuffer{max: consoleTail}
	)
	wg.Go(func() {
		var w io.Writer = console
		if opts.Console != nil {
			w = io.MultiWriter(console, opts.Console)
		}
		io.Copy(w, conR)
		conR.Close()
	})
	parser := newResultParser(res, res.Nonce, start, opts.Progress)
	wg.Go(func() {
		var r io.Reader = resR
		if opts.Transcript != nil {
			r = io.TeeReader(resR, opts.Transcript)
		}
		parser.read(r, time.Now)
		resR.Close()
	})

	var qerr error
	select {
	case qerr = <-waitErr:
	case <-ctx.Done():
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-waitErr
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			qerr = fmt.Errorf("VM timed out after %s", timeout)
		} else {
			qerr = fmt.Errorf("VM stopped: %w", ctx.Err())
		}
	}
	// qemu is gone; nothing else holds the pipes' write ends.
	wg.Wait()
	res.Duration = time.Since(start)
	res.Console = console.Bytes()
	switch {
	case qerr != nil:
		var ee *exec.ExitError
		if errors.As(qerr, &ee) {
			qerr = fmt.Errorf("qemu: %w: %s", qerr, strings.TrimSpace(string(stderr.Bytes())))
		}
		res.Err = qerr
	case !res.Done:
		res.Err = fmt.Errorf("VM powered off before the tests finished (kernel panic? see the console): %s", strings.TrimSpace(string(stderr.Bytes())))
	}
	return res, nil
}

// qemuArgs returns the emulator's command line: TCG, no display and no
// default devices, the kernel console on ttyS0 (fd 3) and the results on
// ttyS1 (fd 4), no reboot: a guest power-off or panic ends qemu.
func qemuArgs(kernel, initrd, nonce string, opts BootOptions) []string {
	cmdline := []string{
		"console=ttyS0", "loglevel=4", "panic=-1", "rdinit=/init",
		// TCG emulates no speculative-execution bugs worth mitigating, and
		// the mitigations cost emulated time.
		"mitigations=off",
		"meshcrypt.nonce=" + nonce,
	}
	args := []string{
		"-accel", "tcg", "-cpu", "max",
		"-smp", strconv.Itoa(cmp.Or(opts.CPUs, 2)),
		"-m", strconv.Itoa(cmp.Or(opts.Memory, 1024)),
		"-nodefaults", "-display", "none", "-no-reboot",
		"-kernel", kernel, "-initrd", initrd,
		"-chardev", "file,id=console,path=/dev/fd/3",
		"-chardev", "file,id=results,path=/dev/fd/4",
		"-serial", "chardev:console", "-serial", "chardev:results",
	}
	if opts.Network {
		cmdline = append(cmdline, "meshcrypt.net=1")
		args = append(args, "-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0")
	}
	if opts.Append != "" {
		cmdline = append(cmdline, opts.Append)
	}
	return append(args, "-append", strings.Join(cmdline, " "))
}

// bootInitrd writes the image's initramfs followed by an archive of the
// boot-time files to dst. The kernel unpacks concatenated archives in
// order, later files replacing earlier ones.
func bootInitrd(base, dst string, opts BootOptions) (string, error) {
	a := &Archive{}
	for _, f := range opts.Files {
		a.Bytes(f.Path, f.Data, f.perm())
	}
	if len(opts.Env) > 0 {
		var env strings.Builder
		keys := make([]string, 0, len(opts.Env))
		for k := range opts.Env {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		for _, k := range keys {
			fmt.Fprintf(&env, "export %s=%s\n", k, shellQuote(opts.Env[k]))
		}
		a.Bytes(guestEnvFile, []byte(env.String()), 0o644)
	}
	in, err := os.Open(base)
	if err != nil {
		return "", err
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return "", err
	}
	_, err = io.Copy(out, in)
	if err == nil {
		_, err = a.WriteTo(out)
	}
	if err = errors.Join(err, out.Close()); err != nil {
		return "", fmt.Errorf("boot initramfs: %w", err)
	}
	return dst, nil
}

// tailBuffer keeps the last max bytes written to it. It is safe for
// concurrent use.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	buf []byte
}

func (b *tailBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.buf = append(b.buf, p...)
	if over := len(b.buf) - b.max; over > 0 {
		b.buf = append(b.buf[:0], b.buf[over:]...)
	}
	return len(p), nil
}

// Bytes returns a copy of the kept bytes.
func (b *tailBuffer) Bytes() []byte {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.buf)
}
