// Package testutil holds helpers shared by the project's privileged tests: a fresh network
// namespace per test, the root check, and what the running kernel was built with. It is imported only from _test.go files.
package testutil

import (
	"bufio"
	"compress/gzip"
	"os"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/meshcrypt/meshcrypt/internal/netnsutil"
)

// RequireRoot skips t when the test process is not root: privileged tests need CAP_NET_ADMIN
// and CAP_BPF. CI runs as root, where nothing skips.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (CAP_NET_ADMIN, CAP_BPF)")
	}
}

// NewNetNS creates an anonymous network namespace that lives until the test ends and returns
// a netlink handle bound to it. The calling thread's namespace is left unchanged.
func NewNetNS(t testing.TB) (netns.NsHandle, *netlink.Handle) {
	t.Helper()
	RequireRoot(t)
	var ns netns.NsHandle
	// netns.New moves the thread into the new namespace; OnLockedThread moves it back.
	err := netnsutil.OnLockedThread(func() error {
		var err error
		ns, err = netns.New()
		return err
	})
	if err != nil {
		if ns.IsOpen() {
			ns.Close()
		}
		t.Fatalf("create netns: %v", err)
	}
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		ns.Close()
		t.Fatalf("netlink handle in netns: %v", err)
	}
	t.Cleanup(func() {
		h.Close()
		ns.Close()
	})
	return ns, h
}

// KernelFeature reports whether the running kernel has a feature, and whether that is known
// rather than guessed: the module is loaded (/sys/module/MODULE), or the kernel config
// (/proc/config.gz) builds CONFIG_OPTION in or leaves it unset. A loadable module that is not
// loaded, or no config to read, is unknown.
func KernelFeature(module, option string) (available, known bool) {
	if _, err := os.Stat("/sys/module/" + module); err == nil {
		return true, true
	}
	f, err := os.Open("/proc/config.gz")
	if err != nil {
		return false, false
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		return false, false
	}
	sc := bufio.NewScanner(zr)
	for sc.Scan() {
		switch sc.Text() {
		case "CONFIG_" + option + "=y":
			return true, true
		case "# CONFIG_" + option + " is not set":
			return false, true
		}
	}
	return false, false
}
