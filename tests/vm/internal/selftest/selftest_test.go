package selftest

import (
	"bufio"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshcrypt/meshcrypt/internal/testutil"
	"github.com/vishvananda/netlink"
)

// modeEnv selects the misbehaviour the harness's own tests ask for:
// "fail" makes TestFailOnRequest fail.
const modeEnv = "MESHCRYPT_VM_SELFTEST"

func TestMain(m *testing.M) {
	code := m.Run()
	if os.Getenv("MESHCRYPT_VM") == "1" {
		// Output without a final newline right before the binary exits:
		// the harness's end marker must still be found.
		fmt.Print("selftest: no newline at the end")
	}
	os.Exit(code)
}

func inVM(t *testing.T) {
	t.Helper()
	if os.Getenv("MESHCRYPT_VM") != "1" {
		t.Skip("runs in the VM (tests/vm)")
	}
}

func TestPass(t *testing.T) {
	t.Log("hello from the guest")
}

func TestSkip(t *testing.T) {
	t.Skip("skipped on purpose")
}

func TestFailOnRequest(t *testing.T) {
	t.Log("before the failure")
	if os.Getenv(modeEnv) == "fail" {
		t.Errorf("failing on purpose (%s=fail)", modeEnv)
	}
}

func TestSubtests(t *testing.T) {
	t.Run("plain", func(t *testing.T) { t.Log("in plain") })
	t.Run("with/slash", func(t *testing.T) { t.Log("in with/slash") })
	t.Run("skipped", func(t *testing.T) { t.Skip("inner skip") })
	t.Run("parallel", func(t *testing.T) {
		var wg sync.WaitGroup
		wg.Add(2)
		for _, name := range []string{"a", "b"} {
			t.Run(name, func(t *testing.T) {
				t.Parallel()
				wg.Done()
				wg.Wait() // both run at once: their output interleaves
				for i := range 3 {
					t.Logf("%s line %d", name, i)
				}
			})
		}
	})
}

// TestHostNetwork fetches $MESHCRYPT_VM_SELFTEST_URL, a server on the host
// reached through qemu's user network, several times at once, and checks
// that nothing beyond the host is routed.
func TestHostNetwork(t *testing.T) {
	inVM(t)
	url := os.Getenv("MESHCRYPT_VM_SELFTEST_URL")
	if url == "" {
		t.Skip("no MESHCRYPT_VM_SELFTEST_URL: the VM has no network")
	}
	want := os.Getenv("MESHCRYPT_VM_SELFTEST_BODY")
	var wg sync.WaitGroup
	for i := range 4 {
		wg.Go(func() {
			resp, err := http.Get(fmt.Sprintf("%s?i=%d", url, i))
			if err != nil {
				t.Errorf("GET %s: %v", url, err)
				return
			}
			defer resp.Body.Close()
			b, err := io.ReadAll(resp.Body)
			if err != nil || string(b) != want {
				t.Errorf("GET %s: %q, %v; want %q", url, b, err, want)
			}
		})
	}
	wg.Wait()
	c, err := net.DialTimeout("tcp", "192.0.2.1:80", 2*time.Second)
	if err == nil {
		c.Close()
		t.Error("dialed 192.0.2.1:80: the guest must not reach beyond the host")
	}
}

// TestGuest checks the guest environment the kernel suites rely on.
func TestGuest(t *testing.T) {
	inVM(t)
	t.Run("mounts", func(t *testing.T) {
		want := map[string]string{"/proc": "proc", "/sys": "sysfs", "/dev": "devtmpfs", "/run": "tmpfs",
			"/tmp": "tmpfs", "/sys/fs/bpf": "bpf", "/sys/fs/cgroup": "cgroup2"}
		f, err := os.Open("/proc/self/mountinfo")
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		got := map[string]string{}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			// id parent major:minor root mountpoint options ... - fstype source ...
			fields := strings.Fields(sc.Text())
			for i, fld := range fields {
				if fld == "-" && i+1 < len(fields) {
					got[fields[4]] = fields[i+1]
				}
			}
		}
		for mnt, fs := range want {
			if got[mnt] != fs {
				t.Errorf("%s: mounted %q, want %s", mnt, got[mnt], fs)
			}
		}
		if p, err := os.Readlink("/var/run"); err != nil || p != "../run" {
			t.Errorf("/var/run -> %q, %v; want ../run", p, err)
		}
	})
	t.Run("modules", func(t *testing.T) {
		for _, m := range []string{"wireguard", "esp4", "xfrm_user", "cls_bpf", "sch_ingress", "gcm", "seqiv", "veth", "bridge", "tun"} {
			if _, err := os.Stat("/sys/module/" + m); err != nil {
				t.Errorf("module %s not loaded: %v", m, err)
			}
		}
		if _, err := os.Stat("/dev/net/tun"); err != nil {
			t.Errorf("/dev/net/tun: %v", err)
		}
	})
	t.Run("autoload", func(t *testing.T) {
		// sch_netem is in the image but not loaded at boot: adding the
		// qdisc makes the kernel call /sbin/modprobe.
		if _, err := os.Stat("/sys/module/sch_netem"); err == nil {
			t.Fatal("sch_netem already loaded; pick another module")
		}
		_, h := testutil.NewNetNS(t)
		lo, err := h.LinkByName("lo")
		if err != nil {
			t.Fatal(err)
		}
		q := netlink.NewNetem(netlink.QdiscAttrs{LinkIndex: lo.Attrs().Index, Handle: netlink.MakeHandle(1, 0), Parent: netlink.HANDLE_ROOT},
			netlink.NetemQdiscAttrs{Latency: 1000})
		if err := h.QdiscAdd(q); err != nil {
			t.Fatalf("add netem qdisc (autoloads sch_netem): %v", err)
		}
		if _, err := os.Stat("/sys/module/sch_netem"); err != nil {
			t.Errorf("sch_netem after adding the qdisc: %v", err)
		}
	})
	t.Run("ip-netns", func(t *testing.T) {
		// iproute2's ip, when the image has it (Options.HostPrograms):
		// netenv runs processes in node namespaces with ip netns exec.
		ip, err := exec.LookPath("ip")
		if err != nil || ip == "/sbin/ip" { // busybox's ip has no netns
			t.Skip("no iproute2 ip in the image")
		}
		name := "selftest-" + strconv.Itoa(os.Getpid())
		if out, err := exec.Command(ip, "netns", "add", name).CombinedOutput(); err != nil {
			t.Fatalf("ip netns add: %v\n%s", err, out)
		}
		defer exec.Command(ip, "netns", "del", name).Run()
		out, err := exec.Command(ip, "netns", "exec", name, ip, "-o", "link", "show").CombinedOutput()
		if err != nil {
			t.Fatalf("ip netns exec: %v\n%s", err, out)
		}
		if lines := strings.Split(strings.TrimSpace(string(out)), "\n"); len(lines) != 1 || !strings.Contains(lines[0], "lo:") {
			t.Errorf("links in a new namespace:\n%s\nwant only lo", out)
		}
	})
	t.Run("esp-gcm", func(t *testing.T) {
		_, h := testutil.NewNetNS(t)
		key := make([]byte, 20) // AES-128 key plus 4 bytes of salt
		rand.Read(key)
		st := &netlink.XfrmState{
			Src: net.ParseIP("192.0.2.1"), Dst: net.ParseIP("192.0.2.2"),
			Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TUNNEL, Spi: 0x100, Reqid: 1,
			Aead: &netlink.XfrmStateAlgo{Name: "rfc4106(gcm(aes))", Key: key, ICVLen: 128},
		}
		if err := h.XfrmStateAdd(st); err != nil {
			t.Fatalf("add ESP state with rfc4106(gcm(aes)): %v", err)
		}
	})
}
