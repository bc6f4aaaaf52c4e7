package identity

// The probe sequence of a label set is double hashing over the local range: it starts at
// Hash mod size and steps by a number coprime with size derived from the hash's upper half,
// so the first size probes visit every local exactly once and two colliding sets usually part
// after one step (no primary clustering, unlike linear probing).

// Preferred returns the deterministic first choice of local number for l: MinLocal plus its
// hash modulo LocalSpace. It equals Probe(l, 0).
func Preferred(l Labels) uint16 { return Probe(l, 0) }

// Probe returns the i-th local number of l's probe sequence over the whole local range. The
// first LocalSpace probes are all different; the sequence then repeats.
func Probe(l Labels, i int) uint16 { return newSequence(l.Hash(), LocalSpace).at(i) }

// sequence is a probe sequence over the locals MinLocal .. MinLocal+size-1.
type sequence struct {
	start, step, size uint64
}

func newSequence(h uint64, size int) sequence {
	m := uint64(size)
	s := sequence{start: h % m, step: 1, size: m}
	if m > 1 {
		s.step = 1 + (h>>32)%(m-1)
		for gcd(s.step, m) != 1 {
			s.step++
			if s.step == m {
				s.step = 1
			}
		}
	}
	return s
}

// at returns the i-th local number; i must be >= 0.
func (s sequence) at(i int) uint16 {
	return uint16(MinLocal + (s.start+(uint64(i)%s.size)*s.step)%s.size)
}

// index returns the position of local in the sequence (at(index) == local, 0 <= index < size),
// or -1 if local lies outside the sequence's range.
func (s sequence) index(local uint16) int {
	if local < MinLocal || uint64(local-MinLocal) >= s.size {
		return -1
	}
	x := uint64(local - MinLocal)
	d := (x + s.size - s.start) % s.size
	return int(d * modInverse(s.step, s.size) % s.size)
}

func gcd(a, b uint64) uint64 {
	for b != 0 {
		a, b = b, a%b
	}
	return a
}

// modInverse returns x with a*x = 1 mod m, for a coprime with m (m >= 1).
func modInverse(a, m uint64) uint64 {
	if m == 1 {
		return 0
	}
	// Extended Euclid on signed values; m <= 65280 so nothing overflows.
	t, newT := int64(0), int64(1)
	r, newR := int64(m), int64(a%m)
	for newR != 0 {
		q := r / newR
		t, newT = newT, t-q*newT
		r, newR = newR, r-q*newR
	}
	if t < 0 {
		t += int64(m)
	}
	return uint64(t)
}
