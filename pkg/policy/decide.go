package policy

// Verdict is the outcome of one direction check or of a whole decision.
type Verdict struct {
	Allowed bool
	// Enforced is false when the subject is not default-deny in the direction (no policy
	// selects it): allowed without a rule.
	Enforced bool
	// Rule is the allowing rule (1-based index into Result.Rules), 0 if none.
	Rule uint32
	// Key is the allow entry that matched.
	Key Key
	// Encrypt is true when the traffic must be encrypted cross-node.
	Encrypt bool
}

// Check evaluates one direction exactly as the classifier does: not default-deny means
// allowed; otherwise the first of six lookups, from the most to the least specific, allows.
func (r *Result) Check(subject, peer uint32, proto uint8, port uint16, dir Direction) Verdict {
	ef := r.Enforce[EnforceKey{subject, dir}]
	v := Verdict{Enforced: ef&EnforceDeny != 0, Encrypt: ef&EnforceEncrypt != 0}
	if !v.Enforced {
		v.Allowed = true
		return v
	}
	for _, k := range LookupOrder(subject, peer, proto, port, dir) {
		if e, ok := r.Allow[k]; ok {
			v.Allowed, v.Rule, v.Key = true, e.Rule, k
			v.Encrypt = v.Encrypt || e.Flags&FlagEncrypt != 0
			return v
		}
	}
	return v
}

// LookupOrder is the sequence of keys a direction check tries.
func LookupOrder(subject, peer uint32, proto uint8, port uint16, dir Direction) [6]Key {
	k := func(peer uint32, proto uint8, port uint16) Key {
		return Key{Subject: subject, Peer: peer, Proto: proto, Port: port, Dir: dir}
	}
	return [6]Key{
		k(peer, proto, port), k(peer, proto, 0), k(peer, 0, 0),
		k(0, proto, port), k(0, proto, 0), k(0, 0, 0),
	}
}

// Decision is a packet's verdict from source to destination: the source's egress and the
// destination's ingress.
type Decision struct {
	Egress, Ingress Verdict
}

// Allowed reports whether both directions allow.
func (d Decision) Allowed() bool { return d.Egress.Allowed && d.Ingress.Allowed }

// Decide evaluates a packet from src to dst.
func (r *Result) Decide(src, dst uint32, proto uint8, port uint16) Decision {
	return Decision{
		Egress:  r.Check(src, dst, proto, port, Egress),
		Ingress: r.Check(dst, src, proto, port, Ingress),
	}
}
