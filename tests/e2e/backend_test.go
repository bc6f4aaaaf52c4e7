package e2e

import (
	"cmp"
	"os"
	"syscall"
	"testing"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/tests/cluster"
)

// What the suites expect of the kernel they run on. On the build machines (kernel 6.18
// without WireGuard) agents run the userspace device and attach with TCX; in the VM of
// tests/vm (Debian's cloud kernels, which sets MESHCRYPT_VM=1) they run kernel WireGuard and
// attach as $MESHCRYPT_VM_ATTACH says the booted kernel must: legacy tc on 6.1, TCX on 6.12.
var (
	// inVM: the suite runs inside tests/vm's VM.
	inVM = os.Getenv("MESHCRYPT_VM") == "1"
	// wgBackend is the WireGuard backend the clusters' agents use (--wireguard-backend) and
	// must report in their MeshNode status; autoAttach is the attach mode they must report
	// with --attach-mode auto (TCX where the kernel has it, >= 6.6, else tc).
	wgBackend, autoAttach = func() (v1alpha1.WireGuardBackend, string) {
		if inVM {
			return v1alpha1.BackendKernel, cmp.Or(os.Getenv("MESHCRYPT_VM_ATTACH"), "tc")
		}
		return v1alpha1.BackendUserspace, "tcx"
	}()
)

// breakDevice takes n's WireGuard device away as a crash would: SIGKILL of the userspace
// device process, deletion of the kernel link. It returns a condition that holds once a new
// device has replaced the old one.
func breakDevice(t *testing.T, n *cluster.Node) (replaced func() bool) {
	t.Helper()
	if wgBackend == v1alpha1.BackendUserspace {
		pid := devicePID(t, n.Iface)
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		return func() bool {
			p, ok := findDevicePID(n.Iface)
			return ok && p != pid
		}
	}
	h, err := n.NS.Handle()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	link, err := h.LinkByName(n.Iface)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.LinkDel(link); err != nil {
		t.Fatalf("delete %s in %s: %v", n.Iface, n.Name, err)
	}
	return func() bool {
		l, err := h.LinkByName(n.Iface)
		return err == nil && l.Attrs().Index != link.Attrs().Index && l.Type() == "wireguard"
	}
}
