package vm_test

import (
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/meshcrypt/meshcrypt/tests/vm"
)

// vmKernel is a kernel the VM suites boot, with what it must offer there.
type vmKernel struct {
	// Name is the kernel series ("6.1", "6.12"): the subtest's name, and
	// the start of the release the package must unpack to, so that apt
	// moving a suite to another series fails here rather than silently
	// testing something else.
	Name string
	// Kernel selects the Debian package.
	Kernel vm.KernelOptions
	// Attach is the attach mode the classifier must pick with AttachAuto
	// (and agents with --attach-mode auto) on this kernel: "tcx" from
	// Linux 6.6, "tc" before. The guest gets it in vm.AttachEnv; the tests
	// there fail when the kernel answers otherwise.
	Attach string
}

// vmKernels are the kernels the VM suites run on, in order. The host (6.18)
// covers TCX with userspace WireGuard and no ESP; 6.1 covers kernel
// WireGuard, ESP and legacy tc; 6.12, what most production nodes run,
// covers kernel WireGuard, ESP and TCX together. $MESHCRYPT_VM_KERNELS
// (comma-separated names) runs a subset.
var vmKernels = []vmKernel{
	{Name: "6.1", Kernel: vm.KernelOptions{}, Attach: "tc"},
	{Name: "6.12", Kernel: vm.KernelOptions{Release: "trixie"}, Attach: "tcx"},
}

// kernelsEnv selects a subset of vmKernels by name.
const kernelsEnv = "MESHCRYPT_VM_KERNELS"

// selectedKernels returns the kernels $MESHCRYPT_VM_KERNELS names, all of
// vmKernels when it is unset. An unknown name fails t.
func selectedKernels(t testing.TB) []vmKernel {
	t.Helper()
	env := strings.TrimSpace(os.Getenv(kernelsEnv))
	if env == "" {
		return vmKernels
	}
	var ks []vmKernel
	for name := range strings.SplitSeq(env, ",") {
		name = strings.TrimSpace(name)
		i := slices.IndexFunc(vmKernels, func(k vmKernel) bool { return k.Name == name })
		if i < 0 {
			t.Fatalf("$%s names kernel %q; the VM suites know %s", kernelsEnv, name, kernelNames())
		}
		ks = append(ks, vmKernels[i])
	}
	return ks
}

func kernelNames() string {
	var names []string
	for _, k := range vmKernels {
		names = append(names, k.Name)
	}
	return strings.Join(names, ", ")
}

// forEachKernel runs f as a subtest per selected kernel, in order.
func forEachKernel(t *testing.T, f func(t *testing.T, k vmKernel)) {
	t.Helper()
	for _, k := range selectedKernels(t) {
		t.Run(k.Name, func(t *testing.T) { f(t, k) })
	}
}

// checkRelease fails t unless img boots a kernel of k's series.
func (k vmKernel) checkRelease(t testing.TB, img *vm.Image) {
	t.Helper()
	if rel := img.Kernel.Release; !strings.HasPrefix(rel, k.Name+".") {
		t.Fatalf("kernel %s: %s %s unpacks to release %s, not %s.x: check vmKernels against what apt offers",
			k.Name, img.Kernel.Package, img.Kernel.Version, rel, k.Name)
	}
}

// env returns what the guest's tests learn about k.
func (k vmKernel) env() map[string]string {
	return map[string]string{vm.AttachEnv: k.Attach}
}
