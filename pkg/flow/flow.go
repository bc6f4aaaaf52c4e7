package flow

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/meshcrypt/meshcrypt/pkg/identity"
)

// Path is where an agent serves its flow stream.
const Path = "/flows"

// ContentType is the stream's media type: JSON lines.
const ContentType = "application/x-ndjson"

// Verdict is what the classifier did with a packet.
type Verdict string

// The verdicts.
const (
	// Allow: the packet passed.
	Allow Verdict = "allow"
	// Drop: the packet was dropped.
	Drop Verdict = "drop"
)

// ParseVerdict parses "allow" or "drop".
func ParseVerdict(s string) (Verdict, error) {
	switch v := Verdict(strings.ToLower(s)); v {
	case Allow, Drop:
		return v, nil
	}
	return "", fmt.Errorf("verdict %q: want allow or drop", s)
}

// Record is one line of an agent's flow stream: a flow event or a count of events that did
// not make it. Exactly one of Flow and Lost is set.
type Record struct {
	// Time is when the classifier saw the packet (Flow), or when the loss was noticed (Lost).
	Time time.Time `json:"time"`
	// Node is the agent's node.
	Node string `json:"node"`
	// Flow is a flow event.
	Flow *Flow `json:"flow,omitempty"`
	// Lost counts events that were not delivered.
	Lost *Lost `json:"lost,omitempty"`
}

// Flow is one packet the classifier passed or dropped (docs/datapath.md, "Flow events").
type Flow struct {
	// Direction is "from_pod" (leaving a local pod) or "to_pod" (delivered to a local pod).
	Direction string `json:"direction"`
	// Verdict is allow or drop.
	Verdict Verdict `json:"verdict"`
	// Reason is the classifier's reason (the metrics' reason label): allowed,
	// allowed_no_policy, denied_egress, denied_ingress, drop_not_encrypted, drop_malformed.
	Reason string `json:"reason"`
	// Encrypted: the packet passed and goes into (from_pod) or came out of (to_pod) a ready
	// tunnel to the peer's node.
	Encrypted bool `json:"encrypted"`
	// Remote: the peer (destination for from_pod, source for to_pod) is a pod on another node.
	Remote bool `json:"remote"`
	// Sampled: an allowed packet the 1-in-N sampler picked (drops and TCP SYNs are not
	// sampled: each is reported, up to the rate limit).
	Sampled bool `json:"sampled,omitempty"`
	// Connection is how the classifier placed the packet in its connection table:
	// ConnectionNew (judged by policy as a connection's first packet, or a packet judged on
	// its own), ConnectionEstablished (a later packet from the originator of an allowed
	// connection) or ConnectionReply (from the responder, or an ICMP error about the
	// connection).
	Connection string `json:"connection,omitempty"`
	// Protocol is TCP, UDP, ICMP, ICMPv6, SCTP or the protocol number.
	Protocol string `json:"protocol"`
	// TCPFlags are the TCP flags set, such as "SYN" or "ACK|PSH".
	TCPFlags string `json:"tcpFlags,omitempty"`
	// Length is the packet's length in bytes, Ethernet header included.
	Length uint32 `json:"length"`
	// Source and Destination are the packet's endpoints.
	Source      Endpoint `json:"source"`
	Destination Endpoint `json:"destination"`
}

// The values of Flow.Connection.
const (
	ConnectionNew         = "new"
	ConnectionEstablished = "established"
	ConnectionReply       = "reply"
)

// Endpoint is one end of a flow.
type Endpoint struct {
	// Identity is the numeric identity; 0 when not known (malformed packets).
	Identity uint32 `json:"identity"`
	// Labels are the identity's canonical labels, when the agent knows them.
	Labels map[string]string `json:"labels,omitempty"`
	// IP is the address; absent when the packet was too malformed to parse it.
	IP netip.Addr `json:"ip,omitzero"`
	// Port is the TCP, UDP or SCTP port; 0 for other protocols and non-first fragments.
	Port uint16 `json:"port,omitempty"`
}

// Lost counts events that did not reach the client.
type Lost struct {
	// Events is how many since the previous Lost record of the same cause.
	Events uint64 `json:"events"`
	// Cause is LostRingFull, LostRateLimited or LostSlowClient.
	Cause string `json:"cause"`
}

// The causes of lost events.
const (
	// LostRingFull: the classifier found its ring buffer full (the agent fell behind).
	LostRingFull = "ring_full"
	// LostRateLimited: the classifier's per-CPU rate limit suppressed them (by design).
	LostRateLimited = "rate_limited"
	// LostSlowClient: the agent dropped them because this client did not keep up.
	LostSlowClient = "slow_client"
)

// ProtocolName names an IP protocol number.
func ProtocolName(p uint8) string {
	switch p {
	case 1:
		return "ICMP"
	case 6:
		return "TCP"
	case 17:
		return "UDP"
	case 58:
		return "ICMPv6"
	case 132:
		return "SCTP"
	}
	return strconv.Itoa(int(p))
}

var tcpFlagNames = [8]string{"FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"}

// TCPFlagNames names the flags set in a TCP header's flags byte, "|"-separated; "" for none.
func TCPFlagNames(b uint8) string {
	var names []string
	for i, n := range tcpFlagNames {
		if b&(1<<i) != 0 {
			names = append(names, n)
		}
	}
	return strings.Join(names, "|")
}

var reservedNames = map[identity.Identity]string{
	identity.Host: "host", identity.World: "world", identity.Unmanaged: "unmanaged",
	identity.Health: "health", identity.Init: "init", identity.RemoteNode: "remote-node",
}

// IdentityString shows an identity with what it stands for: "4660(default app=web)" (the
// namespace, then the pod labels; the other meshcrypt.io/ labels are left out), "2(world)",
// "16777216(cidr)" for an ipBlock's CIDR identity, the bare number when the labels are not
// known, "?" for 0.
func IdentityString(id uint32, labels map[string]string) string {
	if id == 0 {
		return "?"
	}
	num := strconv.FormatUint(uint64(id), 10)
	if name, ok := reservedNames[identity.Identity(id)]; ok {
		return num + "(" + name + ")"
	}
	if identity.Identity(id).IsCIDR() {
		return num + "(cidr)" // a node-local identity of a policy's ipBlock prefix
	}
	if len(labels) == 0 {
		return num
	}
	var parts []string
	if ns, ok := labels[identity.LabelNamespace]; ok {
		parts = append(parts, ns)
	}
	for _, k := range slices.Sorted(maps.Keys(labels)) {
		if k == identity.ReservedDomain || strings.HasPrefix(k, identity.ReservedDomain+"/") {
			continue
		}
		parts = append(parts, k+"="+labels[k])
	}
	if len(parts) == 0 {
		return num
	}
	return num + "(" + strings.Join(parts, " ") + ")"
}

// Text is the record on one line, for people:
//
//	15:04:05.000 n1 from_pod 10.244.1.5:40000 4660(default app=web) -> 10.244.2.7:7100 5231(default app=db) UDP allow allowed encrypted=yes cross-node
//	15:04:05.000 n1 lost 12 events (ring_full)
func (r Record) Text() string {
	var b strings.Builder
	b.WriteString(r.Time.Local().Format("15:04:05.000"))
	b.WriteString(" " + r.Node)
	switch {
	case r.Flow != nil:
		f := r.Flow
		fmt.Fprintf(&b, " %s %s -> %s %s", f.Direction, endpointString(f.Source), endpointString(f.Destination), f.Protocol)
		if f.TCPFlags != "" {
			b.WriteString(" " + f.TCPFlags)
		}
		fmt.Fprintf(&b, " %s %s", f.Verdict, f.Reason)
		switch f.Connection {
		case ConnectionReply:
			b.WriteString(" (reply of an allowed connection)")
		case ConnectionEstablished:
			b.WriteString(" (established)")
		}
		if f.Encrypted {
			b.WriteString(" encrypted=yes")
		} else {
			b.WriteString(" encrypted=no")
		}
		if f.Remote {
			b.WriteString(" cross-node")
		}
	case r.Lost != nil:
		fmt.Fprintf(&b, " lost %d events (%s)", r.Lost.Events, r.Lost.Cause)
	}
	return b.String()
}

func endpointString(e Endpoint) string {
	addr := "?"
	if e.IP.IsValid() {
		addr = e.IP.String()
		if e.Port != 0 {
			addr = netip.AddrPortFrom(e.IP, e.Port).String()
		}
	}
	return addr + " " + IdentityString(e.Identity, e.Labels)
}
