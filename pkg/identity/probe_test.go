package identity

import (
	"fmt"
	"math/rand/v2"
	"testing"
)

func mustCanonical(t testing.TB, pod map[string]string, ns string) Labels {
	t.Helper()
	l, err := Canonical(pod, ns, "", "c1")
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// TestPreferredGolden pins the hash: a change would move every set's first choice, so agents
// of different versions would walk different sequences during an upgrade.
func TestPreferredGolden(t *testing.T) {
	l := mustCanonical(t, map[string]string{"app": "web"}, "default")
	if got, want := l.Key(), "app=web;meshcrypt.io/cluster=c1;meshcrypt.io/namespace=default;meshcrypt.io/serviceaccount=default"; got != want {
		t.Fatalf("Key = %q, want %q", got, want)
	}
	const wantHash, wantPreferred = 0xcdf862cccc6521ad, 19117
	if got := l.Hash(); got != wantHash {
		t.Errorf("Hash = %#x, want %#x", got, uint64(wantHash))
	}
	if p := Preferred(l); p != wantPreferred || p != Probe(l, 0) {
		t.Errorf("Preferred = %d (Probe 0 = %d), want %d", p, Probe(l, 0), wantPreferred)
	}
}

// TestSequenceIsPermutation checks that the first size probes visit every local of the range
// exactly once, and that index inverts at, for many sizes and hashes.
func TestSequenceIsPermutation(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	sizes := []int{1, 2, 3, 4, 8, 16, 17, 255, 256, 1000, 4096, LocalSpace}
	for range 20 {
		sizes = append(sizes, 1+r.IntN(LocalSpace))
	}
	for _, size := range sizes {
		for range 5 {
			h := r.Uint64()
			seq := newSequence(h, size)
			seen := make([]bool, size)
			for i := range size {
				local := seq.at(i)
				if local < MinLocal || int(local-MinLocal) >= size {
					t.Fatalf("size %d hash %#x: probe %d = %d outside the range", size, h, i, local)
				}
				if seen[local-MinLocal] {
					t.Fatalf("size %d hash %#x: probe %d revisits %d", size, h, i, local)
				}
				seen[local-MinLocal] = true
				if j := seq.index(local); j != i {
					t.Fatalf("size %d hash %#x: index(at(%d)) = %d", size, h, i, j)
				}
			}
			if seq.at(size) != seq.at(0) {
				t.Fatalf("size %d: the sequence does not repeat after size probes", size)
			}
			if size < LocalSpace && seq.index(uint16(MinLocal+size)) != -1 {
				t.Fatalf("size %d: index of a local outside the range is not -1", size)
			}
		}
	}
}

// TestPreferredSpread checks the first choices of many sets spread over the range like
// random numbers: the expected number of distinct slots of n uniform draws from m is
// m(1-(1-1/m)^n).
func TestPreferredSpread(t *testing.T) {
	const n = 5000
	seen := make(map[uint16]bool)
	steps := make(map[uint64]bool)
	for i := range n {
		l := mustCanonical(t, map[string]string{"app": fmt.Sprintf("app-%d", i)}, "default")
		seen[Preferred(l)] = true
		steps[newSequence(l.Hash(), LocalSpace).step] = true
	}
	// Expected distinct: 65280*(1-(1-1/65280)^5000) ~ 4817.
	if len(seen) < 4750 {
		t.Errorf("%d sets have %d distinct preferred numbers, want about 4817", n, len(seen))
	}
	// Steps are the ~16k numbers coprime with LocalSpace, reached by rounding up a uniform
	// draw, so they repeat more than uniform draws would; most sets still step differently.
	if len(steps) < n*3/4 {
		t.Errorf("%d sets have only %d distinct probe steps", n, len(steps))
	}
}

func TestModInverse(t *testing.T) {
	for _, m := range []uint64{1, 2, 7, 16, 255, LocalSpace} {
		for a := uint64(1); a < min(m, 3000); a++ {
			if gcd(a, m) != 1 {
				continue
			}
			if x := modInverse(a, m); m > 1 && a*x%m != 1 {
				t.Fatalf("modInverse(%d, %d) = %d", a, m, x)
			}
		}
	}
}
