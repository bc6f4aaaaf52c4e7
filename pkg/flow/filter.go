package flow

import (
	"fmt"
	"net/url"
	"slices"
	"strconv"
	"strings"

	"k8s.io/apimachinery/pkg/labels"
)

// Query parameters of GET /flows.
const (
	// QueryIdentity selects flows by an endpoint's identity: a number, or a label selector
	// (app=web,tier!=cache) matched against the identity's labels. Repeatable: any one
	// matching suffices; either endpoint may match.
	QueryIdentity = "identity"
	// QueryVerdict selects flows by verdict: allow or drop.
	QueryVerdict = "verdict"
)

// Filter selects flow records. The zero Filter selects everything. Lost records always pass,
// so a client learns of gaps whatever it selects. Add identity terms with AddIdentity.
type Filter struct {
	// Identities match an endpoint's identity number.
	Identities []uint32
	// Verdict, when set, must be the flow's.
	Verdict Verdict

	selectors []selector // match an endpoint's labels
}

// selector is a label selector and the text it was parsed from (its String form may differ,
// and Query must give back what was given).
type selector struct {
	text string
	sel  labels.Selector
}

// AddIdentity adds an identity term: a number, or a label selector (a bare number is always
// taken as an identity, never as the selector "a label with this key exists").
func (f *Filter) AddIdentity(s string) error {
	s = strings.TrimSpace(s)
	if n, err := strconv.ParseUint(s, 10, 32); err == nil {
		if n == 0 {
			return fmt.Errorf("identity %q: 0 names no identity", s)
		}
		f.Identities = append(f.Identities, uint32(n))
		return nil
	}
	sel, err := labels.Parse(s)
	if err != nil {
		return fmt.Errorf("identity %q: neither a number nor a label selector: %w", s, err)
	}
	if sel.Empty() {
		return fmt.Errorf("identity %q: empty selector", s)
	}
	f.selectors = append(f.selectors, selector{text: s, sel: sel})
	return nil
}

// ParseQuery reads a Filter from GET /flows's query parameters.
func ParseQuery(q url.Values) (Filter, error) {
	var f Filter
	for k := range q {
		if k != QueryIdentity && k != QueryVerdict {
			return Filter{}, fmt.Errorf("unknown query parameter %q", k)
		}
	}
	for _, s := range q[QueryIdentity] {
		if err := f.AddIdentity(s); err != nil {
			return Filter{}, err
		}
	}
	if v := q.Get(QueryVerdict); v != "" {
		var err error
		if f.Verdict, err = ParseVerdict(v); err != nil {
			return Filter{}, err
		}
	}
	return f, nil
}

// Query encodes f as GET /flows's query parameters; ParseQuery reads them back.
func (f Filter) Query() url.Values {
	q := url.Values{}
	for _, id := range f.Identities {
		q.Add(QueryIdentity, strconv.FormatUint(uint64(id), 10))
	}
	for _, s := range f.selectors {
		q.Add(QueryIdentity, s.text)
	}
	if f.Verdict != "" {
		q.Set(QueryVerdict, string(f.Verdict))
	}
	return q
}

// Match reports whether f selects r.
func (f Filter) Match(r *Record) bool {
	if r.Flow == nil {
		return true
	}
	if f.Verdict != "" && r.Flow.Verdict != f.Verdict {
		return false
	}
	if len(f.Identities) == 0 && len(f.selectors) == 0 {
		return true
	}
	return f.matchEndpoint(r.Flow.Source) || f.matchEndpoint(r.Flow.Destination)
}

func (f Filter) matchEndpoint(e Endpoint) bool {
	if e.Identity != 0 && slices.Contains(f.Identities, e.Identity) {
		return true
	}
	if len(e.Labels) == 0 {
		return false
	}
	set := labels.Set(e.Labels)
	for _, s := range f.selectors {
		if s.sel.Matches(set) {
			return true
		}
	}
	return false
}
