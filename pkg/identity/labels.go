package identity

import (
	"cmp"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"iter"
	"maps"
	"slices"
	"strings"
)

// The keys meshcrypt adds to every canonical label set. The whole meshcrypt.io domain (and its
// subdomains) is reserved: a pod label under it makes [Canonical] fail.
const (
	// LabelNamespace holds the pod's namespace.
	LabelNamespace = "meshcrypt.io/namespace"
	// LabelServiceAccount holds the pod's service account.
	LabelServiceAccount = "meshcrypt.io/serviceaccount"
	// LabelCluster holds the name of the pod's cluster.
	LabelCluster = "meshcrypt.io/cluster"
	// ReservedDomain is the label key prefix reserved for meshcrypt.
	ReservedDomain = "meshcrypt.io"
)

// MaxLabels is the most labels a canonical set may have, the MeshIdentity CRD's maxProperties
// (the three meshcrypt.io/ keys included).
const MaxLabels = 64

// DefaultServiceAccount is the service account [Canonical] assumes for "", as the API server's
// ServiceAccount admission plugin would have set it.
const DefaultServiceAccount = "default"

// Errors of [Canonical] and [Labels.Validate], wrapped with the offending key or value.
var (
	// ErrInvalidLabel means a key or value breaks the Kubernetes label syntax (or a namespace,
	// service account or cluster name breaks its own).
	ErrInvalidLabel = errors.New("invalid label")
	// ErrReservedLabel means a pod label uses a key in the meshcrypt.io domain.
	ErrReservedLabel = errors.New("label key in the reserved meshcrypt.io domain")
	// ErrTooManyLabels means the canonical set would have more than MaxLabels labels.
	ErrTooManyLabels = errors.New("too many labels")
)

// churnLabels are the pod labels Canonical drops. Each changes without any change to what the
// workload is, so keeping it would give one workload many identities: a new identity per
// rollout or revision (and a policy-map rebuild each time), or one per pod.
var churnLabels = map[string]string{
	// Per rollout: the Deployment controller hashes the pod template into each ReplicaSet.
	"pod-template-hash": "Deployment/ReplicaSet template hash, new on every rollout",
	// The same for Argo Rollouts, a widespread Deployment replacement.
	"rollouts-pod-template-hash": "Argo Rollouts template hash, new on every rollout",
	// Per revision of StatefulSets and DaemonSets.
	"controller-revision-hash": "StatefulSet/DaemonSet revision, new on every update",
	// Per DaemonSet template generation (legacy, still set).
	"pod-template-generation": "DaemonSet template generation, new on every update",
	// Per pod: would make one identity per StatefulSet replica.
	"statefulset.kubernetes.io/pod-name": "StatefulSet pod name, unique per pod",
	"apps.kubernetes.io/pod-index":       "StatefulSet ordinal, unique per pod",
	// Per pod of an Indexed Job.
	"batch.kubernetes.io/job-completion-index": "Indexed Job completion index, unique per pod",
	// Per Job object: the UID changes when a Job is re-created under the same name, and no
	// selector names a UID. job-name (both spellings) is kept: it is how users select a Job's
	// pods, and a CronJob's per-run names churn only once per schedule, bounded by the GC.
	"batch.kubernetes.io/controller-uid": "Job UID, unique per Job object",
	"controller-uid":                     "Job UID (legacy key), unique per Job object",
}

// ChurnLabels returns the pod label keys [Canonical] drops, sorted.
func ChurnLabels() []string { return slices.Sorted(maps.Keys(churnLabels)) }

// IsChurnLabel reports whether Canonical drops the pod label key.
func IsChurnLabel(key string) bool {
	_, ok := churnLabels[key]
	return ok
}

// pair is one label.
type pair struct {
	Key, Value string
}

// Labels is an immutable label set, sorted by key. The zero value is the empty set. Compare
// sets with Equal or by Key, never with ==.
type Labels struct {
	pairs []pair // sorted by Key, keys unique
	key   string // encodeKey(pairs)
}

// FromMap returns the label set of m. It checks nothing, so any map, such as one read back from
// a MeshIdentity, has a set and an injective Key; see [Labels.Validate].
func FromMap(m map[string]string) Labels {
	pairs := make([]pair, 0, len(m))
	for k, v := range m {
		pairs = append(pairs, pair{k, v})
	}
	return fromPairs(pairs)
}

func fromPairs(pairs []pair) Labels {
	slices.SortFunc(pairs, func(a, b pair) int { return strings.Compare(a.Key, b.Key) })
	return Labels{pairs: pairs, key: encodeKey(pairs)}
}

// Canonical returns the canonical label set of a pod: its labels less [ChurnLabels], plus
// [LabelNamespace], [LabelServiceAccount] and [LabelCluster]. An empty serviceAccount means
// [DefaultServiceAccount].
//
// Label keys and values must follow the Kubernetes label syntax (ErrInvalidLabel). namespace and
// cluster must be DNS-1123 labels, serviceAccount a DNS-1123 subdomain. A pod label in the
// meshcrypt.io domain is an error (ErrReservedLabel), not silently overridden: the identity
// must never differ quietly from what the pod says, and an admission policy can reject such
// pods up front. More than [MaxLabels] labels in all is ErrTooManyLabels. Errors name the
// first offending key in sorted order, so they are deterministic.
func Canonical(podLabels map[string]string, namespace, serviceAccount, cluster string) (Labels, error) {
	if serviceAccount == "" {
		serviceAccount = DefaultServiceAccount
	}
	pairs := make([]pair, 0, len(podLabels)+3)
	for _, k := range slices.Sorted(maps.Keys(podLabels)) {
		if IsChurnLabel(k) {
			continue
		}
		if err := checkKey(k); err != nil {
			return Labels{}, fmt.Errorf("canonical labels: %w", err)
		}
		if isReservedKey(k) {
			return Labels{}, fmt.Errorf("canonical labels: pod label %q: %w", k, ErrReservedLabel)
		}
		if err := checkValue(k, podLabels[k]); err != nil {
			return Labels{}, fmt.Errorf("canonical labels: %w", err)
		}
		pairs = append(pairs, pair{k, podLabels[k]})
	}
	for _, l := range []pair{
		{LabelNamespace, namespace},
		{LabelServiceAccount, serviceAccount},
		{LabelCluster, cluster},
	} {
		if err := checkReserved(l.Key, l.Value); err != nil {
			return Labels{}, fmt.Errorf("canonical labels: %w", err)
		}
		pairs = append(pairs, l)
	}
	if len(pairs) > MaxLabels {
		return Labels{}, fmt.Errorf("canonical labels: %d labels, at most %d: %w", len(pairs), MaxLabels, ErrTooManyLabels)
	}
	return fromPairs(pairs), nil
}

// Validate reports whether l is a canonical set, one [Canonical] could have returned: valid
// syntax, the three meshcrypt.io/ keys with valid values, no other meshcrypt.io key, no churn
// label, at most MaxLabels labels.
func (l Labels) Validate() error {
	if len(l.pairs) > MaxLabels {
		return fmt.Errorf("validate labels: %d labels, at most %d: %w", len(l.pairs), MaxLabels, ErrTooManyLabels)
	}
	for _, k := range []string{LabelNamespace, LabelServiceAccount, LabelCluster} {
		if _, ok := l.Get(k); !ok {
			return fmt.Errorf("validate labels: %s missing: %w", k, ErrInvalidLabel)
		}
	}
	for _, p := range l.pairs {
		if err := checkKey(p.Key); err != nil {
			return fmt.Errorf("validate labels: %w", err)
		}
		if IsChurnLabel(p.Key) {
			return fmt.Errorf("validate labels: churn label %q: %w", p.Key, ErrInvalidLabel)
		}
		var err error
		switch {
		case p.Key == LabelNamespace || p.Key == LabelServiceAccount || p.Key == LabelCluster:
			err = checkReserved(p.Key, p.Value)
		case isReservedKey(p.Key):
			err = fmt.Errorf("label %q: %w", p.Key, ErrReservedLabel)
		default:
			err = checkValue(p.Key, p.Value)
		}
		if err != nil {
			return fmt.Errorf("validate labels: %w", err)
		}
	}
	return nil
}

// Len returns the number of labels.
func (l Labels) Len() int { return len(l.pairs) }

// All yields the labels in key order.
func (l Labels) All() iter.Seq2[string, string] {
	return func(yield func(string, string) bool) {
		for _, p := range l.pairs {
			if !yield(p.Key, p.Value) {
				return
			}
		}
	}
}

// Get returns the value of key.
func (l Labels) Get(key string) (string, bool) {
	i, ok := slices.BinarySearchFunc(l.pairs, key, func(p pair, k string) int { return strings.Compare(p.Key, k) })
	if !ok {
		return "", false
	}
	return l.pairs[i].Value, true
}

// Map returns the labels as a new map.
func (l Labels) Map() map[string]string {
	m := make(map[string]string, len(l.pairs))
	for _, p := range l.pairs {
		m[p.Key] = p.Value
	}
	return m
}

// Equal reports whether l and o are the same set.
func (l Labels) Equal(o Labels) bool { return l.key == o.key }

// Compare orders sets by Key.
func (l Labels) Compare(o Labels) int { return cmp.Compare(l.key, o.key) }

// Key returns the set's canonical string, "k1=v1;k2=v2" in key order, with '%', '=' and ';'
// in keys and values escaped as %25, %3D and %3B (valid label syntax has none of them, so keys
// of canonical sets read plainly). Two sets have the same Key if and only if they are equal.
func (l Labels) Key() string { return l.key }

// String returns Key.
func (l Labels) String() string { return l.key }

// hashDomain separates this hash from any other use of SHA-256 over the same bytes. Changing it
// (or the Key encoding) changes every set's preferred number; existing identities stay valid,
// but new agents would walk different sequences, so it is fixed forever for v1alpha1.
const hashDomain = "meshcrypt.io/identity/v1\x00"

// Hash returns the first 8 bytes, big-endian, of SHA-256 over a fixed domain string and Key.
// It is stable across versions and platforms: every agent computes the same probe sequence.
func (l Labels) Hash() uint64 {
	h := sha256.New()
	h.Write([]byte(hashDomain))
	h.Write([]byte(l.key))
	var sum [sha256.Size]byte
	return binary.BigEndian.Uint64(h.Sum(sum[:0]))
}

// encodeKey renders sorted, unique pairs as Key does.
func encodeKey(pairs []pair) string {
	var b strings.Builder
	for i, p := range pairs {
		if i > 0 {
			b.WriteByte(';')
		}
		escape(&b, p.Key)
		b.WriteByte('=')
		escape(&b, p.Value)
	}
	return b.String()
}

func escape(b *strings.Builder, s string) {
	for i := 0; i < len(s); i++ {
		switch c := s[i]; c {
		case '%':
			b.WriteString("%25")
		case '=':
			b.WriteString("%3D")
		case ';':
			b.WriteString("%3B")
		default:
			b.WriteByte(c)
		}
	}
}

// parseKey inverts Key: it accepts exactly the strings Key returns (strictly increasing keys,
// only the three escapes, upper-case hex), so Key is injective because parseKey(l.Key())
// returns l for every l.
func parseKey(s string) (Labels, error) {
	if s == "" {
		return Labels{}, nil
	}
	var pairs []pair
	for item := range strings.SplitSeq(s, ";") {
		k, v, ok := strings.Cut(item, "=")
		if !ok {
			return Labels{}, fmt.Errorf("parse label key: %q has no '='", item)
		}
		uk, err := unescape(k)
		if err != nil {
			return Labels{}, err
		}
		uv, err := unescape(v)
		if err != nil {
			return Labels{}, err
		}
		if n := len(pairs); n > 0 && pairs[n-1].Key >= uk {
			return Labels{}, fmt.Errorf("parse label key: %q not after %q", uk, pairs[n-1].Key)
		}
		pairs = append(pairs, pair{uk, uv})
	}
	return Labels{pairs: pairs, key: s}, nil
}

func unescape(s string) (string, error) {
	if !strings.ContainsAny(s, "%=;") {
		return s, nil
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		switch c := s[i]; c {
		case '=', ';':
			return "", fmt.Errorf("parse label key: unescaped %q in %q", c, s)
		case '%':
			if i+3 > len(s) {
				return "", fmt.Errorf("parse label key: short escape in %q", s)
			}
			switch s[i+1 : i+3] {
			case "25":
				b.WriteByte('%')
			case "3D":
				b.WriteByte('=')
			case "3B":
				b.WriteByte(';')
			default:
				return "", fmt.Errorf("parse label key: bad escape %q in %q", s[i:i+3], s)
			}
			i += 2
		default:
			b.WriteByte(c)
		}
	}
	return b.String(), nil
}

// isReservedKey reports whether key's prefix is the meshcrypt.io domain or a subdomain of it.
func isReservedKey(key string) bool {
	prefix, _, ok := strings.Cut(key, "/")
	if !ok {
		return false
	}
	return prefix == ReservedDomain || strings.HasSuffix(prefix, "."+ReservedDomain)
}

// checkReserved checks the value of one of the three meshcrypt.io/ keys.
func checkReserved(key, value string) error {
	switch key {
	case LabelServiceAccount:
		if !isDNS1123Subdomain(value) {
			return fmt.Errorf("service account %q: must be a DNS-1123 subdomain (lower-case alphanumerics, '-' and '.', at most 253 characters): %w", value, ErrInvalidLabel)
		}
	case LabelNamespace, LabelCluster:
		what := "namespace"
		if key == LabelCluster {
			what = "cluster name"
		}
		if !isDNS1123Label(value) {
			return fmt.Errorf("%s %q: must be a DNS-1123 label (lower-case alphanumerics and '-', at most 63 characters): %w", what, value, ErrInvalidLabel)
		}
	}
	return nil
}

// checkKey checks a label key: an optional DNS-1123 subdomain prefix and '/', then a name of
// 1 to 63 characters, alphanumerics, '-', '_' and '.', starting and ending alphanumeric.
func checkKey(key string) error {
	prefix, name, hasPrefix := strings.Cut(key, "/")
	if !hasPrefix {
		name = key
	}
	switch {
	case hasPrefix && !isDNS1123Subdomain(prefix):
		return fmt.Errorf("label key %q: prefix must be a DNS-1123 subdomain (lower-case alphanumerics, '-' and '.', at most 253 characters): %w", key, ErrInvalidLabel)
	case name == "":
		return fmt.Errorf("label key %q: name is empty: %w", key, ErrInvalidLabel)
	case len(name) > 63:
		return fmt.Errorf("label key %q: name longer than 63 characters: %w", key, ErrInvalidLabel)
	case !isLabelName(name):
		return fmt.Errorf("label key %q: name must be alphanumerics, '-', '_' or '.', starting and ending alphanumeric: %w", key, ErrInvalidLabel)
	}
	return nil
}

// checkValue checks a label value: empty, or up to 63 characters, alphanumerics, '-', '_' and
// '.', starting and ending alphanumeric.
func checkValue(key, value string) error {
	switch {
	case value == "":
		return nil
	case len(value) > 63:
		return fmt.Errorf("label %q: value longer than 63 characters: %w", key, ErrInvalidLabel)
	case !isLabelName(value):
		return fmt.Errorf("label %q: value %q must be alphanumerics, '-', '_' or '.', starting and ending alphanumeric: %w", key, value, ErrInvalidLabel)
	}
	return nil
}

func isAlnum(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9'
}

// isLabelName matches ([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9], length unchecked.
func isLabelName(s string) bool {
	if s == "" || !isAlnum(s[0]) || !isAlnum(s[len(s)-1]) {
		return false
	}
	for i := 1; i < len(s)-1; i++ {
		if c := s[i]; !isAlnum(c) && c != '-' && c != '_' && c != '.' {
			return false
		}
	}
	return true
}

func isLowerAlnum(c byte) bool { return 'a' <= c && c <= 'z' || '0' <= c && c <= '9' }

// isDNS1123Label matches [a-z0-9]([-a-z0-9]*[a-z0-9])? of at most 63 characters.
func isDNS1123Label(s string) bool {
	if s == "" || len(s) > 63 || !isLowerAlnum(s[0]) || !isLowerAlnum(s[len(s)-1]) {
		return false
	}
	for i := 1; i < len(s)-1; i++ {
		if c := s[i]; !isLowerAlnum(c) && c != '-' {
			return false
		}
	}
	return true
}

// isDNS1123Subdomain matches DNS-1123 labels joined by '.', at most 253 characters in all
// (Kubernetes does not limit the length of each part here).
func isDNS1123Subdomain(s string) bool {
	if s == "" || len(s) > 253 {
		return false
	}
	for part := range strings.SplitSeq(s, ".") {
		if part == "" || !isLowerAlnum(part[0]) || !isLowerAlnum(part[len(part)-1]) {
			return false
		}
		for i := 1; i < len(part)-1; i++ {
			if c := part[i]; !isLowerAlnum(c) && c != '-' {
				return false
			}
		}
	}
	return true
}
