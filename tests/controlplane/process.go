package controlplane

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"syscall"
	"time"
)

// stopGrace is how long a process has to exit after SIGTERM before it gets SIGKILL.
const stopGrace = 10 * time.Second

// process is one running child (etcd or kube-apiserver) in its own process group.
type process struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	// logOffset is the size of the log file before this run started: the run's own output
	// starts there.
	logOffset int64
	done      chan struct{}
	// err is the result of cmd.Wait; valid once done is closed.
	err error
}

// startProcess starts bin with args, output appended to logPath. The child gets its own process
// group (so Stop reaches anything it forks) and SIGKILL when its parent thread dies.
//
// Pdeathsig fires when the OS thread that forked the child exits, not the process. The Go runtime
// terminates a thread when a goroutine locked to it exits, which test helpers do on purpose to
// discard threads moved into other network namespaces; a child forked from such a thread would
// be killed at a random moment. So the child is forked from a goroutine locked to its own thread
// that stays alive, waiting for the child, for the child's whole life.
func startProcess(name, bin string, args []string, logPath string) (*process, error) {
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open %s log: %w", name, err)
	}
	st, err := logf.Stat()
	if err != nil {
		logf.Close()
		return nil, fmt.Errorf("stat %s log: %w", name, err)
	}
	fmt.Fprintf(logf, "=== %s: %s %s\n", time.Now().Format(time.RFC3339Nano), bin, strings.Join(args, " "))
	cmd := exec.Command(bin, args...)
	cmd.Stdout = logf
	cmd.Stderr = logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	p := &process{name: name, cmd: cmd, logPath: logPath, logOffset: st.Size(), done: make(chan struct{})}
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		defer logf.Close()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		p.err = cmd.Wait()
		close(p.done)
	}()
	if err := <-started; err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	return p, nil
}

// pid returns the child's pid, which is also its process group id.
func (p *process) pid() int { return p.cmd.Process.Pid }

// exited reports whether the child has exited (and been reaped).
func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM to the child's process group, SIGKILL after grace, and waits until the
// child is reaped. It is idempotent.
func (p *process) stop(grace time.Duration) {
	if p.exited() {
		return
	}
	pgid := p.pid()
	_ = syscall.Kill(-pgid, syscall.SIGTERM)
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-p.done:
	case <-t.C:
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
		<-p.done
	}
}

// output returns what this run of the child wrote to its log so far.
func (p *process) output() []byte {
	f, err := os.Open(p.logPath)
	if err != nil {
		return nil
	}
	defer f.Close()
	if _, err := f.Seek(p.logOffset, io.SeekStart); err != nil {
		return nil
	}
	b, _ := io.ReadAll(f)
	return b
}

// addrInUse reports whether this run of the child failed because a port was taken.
func (p *process) addrInUse() bool {
	return bytes.Contains(p.output(), []byte("address already in use"))
}

// exitError describes how the child ended, with the tail of its log.
func (p *process) exitError() error {
	return fmt.Errorf("%s exited (%v); last log lines:\n%s", p.name, p.err, tail(p.output(), 40))
}

// tail returns at most the last n lines of b.
func tail(b []byte, n int) string {
	s := strings.TrimRight(string(b), "\n")
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// logTail returns the last n lines of the file at path, or a note why it cannot.
func logTail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	return tail(b, n)
}

// freePort returns a TCP port on 127.0.0.1 that was free a moment ago. Another process may take
// it before the caller binds it; callers retry on "address already in use".
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("pick free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// errAddrInUse marks a start that failed because a port was taken; the caller may retry.
var errAddrInUse = errors.New("address already in use")
