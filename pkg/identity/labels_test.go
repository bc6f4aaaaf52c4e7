package identity

import (
	"errors"
	"maps"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestCanonical(t *testing.T) {
	long63 := strings.Repeat("a", 63)
	tests := []struct {
		name              string
		pod               map[string]string
		ns, sa, cluster   string
		want              map[string]string
		wantErr           error
		wantErrSubstrings []string
	}{
		{
			name: "plain", pod: map[string]string{"app": "web", "tier": "frontend"},
			ns: "shop", sa: "web", cluster: "c1",
			want: map[string]string{"app": "web", "tier": "frontend",
				LabelNamespace: "shop", LabelServiceAccount: "web", LabelCluster: "c1"},
		},
		{
			name: "no labels, empty service account means default", ns: "default", cluster: "c1",
			want: map[string]string{LabelNamespace: "default", LabelServiceAccount: "default", LabelCluster: "c1"},
		},
		{
			name: "churn labels dropped",
			pod: map[string]string{
				"app": "db", "pod-template-hash": "5d8f7c9b6", "controller-revision-hash": "db-7f9c",
				"pod-template-generation": "3", "statefulset.kubernetes.io/pod-name": "db-0",
				"apps.kubernetes.io/pod-index": "0", "batch.kubernetes.io/controller-uid": "0b1c",
				"controller-uid": "0b1c", "batch.kubernetes.io/job-completion-index": "2",
				"rollouts-pod-template-hash": "abc", "job-name": "migrate", "batch.kubernetes.io/job-name": "migrate",
			},
			ns: "prod", sa: "db", cluster: "c1",
			want: map[string]string{"app": "db", "job-name": "migrate", "batch.kubernetes.io/job-name": "migrate",
				LabelNamespace: "prod", LabelServiceAccount: "db", LabelCluster: "c1"},
		},
		{
			name: "empty value and prefixed keys", pod: map[string]string{"example.com/flag": "", "app.kubernetes.io/name": "x_y.z-1"},
			ns: "a", sa: "b.c-d", cluster: "e",
			want: map[string]string{"example.com/flag": "", "app.kubernetes.io/name": "x_y.z-1",
				LabelNamespace: "a", LabelServiceAccount: "b.c-d", LabelCluster: "e"},
		},
		{
			name: "63-character name and value", pod: map[string]string{long63: long63}, ns: "n", cluster: "c",
			want: map[string]string{long63: long63, LabelNamespace: "n", LabelServiceAccount: "default", LabelCluster: "c"},
		},
		{
			name: "reserved key", pod: map[string]string{LabelNamespace: "kube-system"}, ns: "evil", cluster: "c",
			wantErr: ErrReservedLabel, wantErrSubstrings: []string{`"meshcrypt.io/namespace"`},
		},
		{
			name: "reserved domain, other name", pod: map[string]string{"meshcrypt.io/anything": "x"}, ns: "n", cluster: "c",
			wantErr: ErrReservedLabel,
		},
		{
			name: "reserved subdomain", pod: map[string]string{"policy.meshcrypt.io/x": "x"}, ns: "n", cluster: "c",
			wantErr: ErrReservedLabel,
		},
		{
			name: "look-alike domain is fine", pod: map[string]string{"notmeshcrypt.io/x": "x"}, ns: "n", cluster: "c",
			want: map[string]string{"notmeshcrypt.io/x": "x", LabelNamespace: "n", LabelServiceAccount: "default", LabelCluster: "c"},
		},
		{name: "key too long", pod: map[string]string{long63 + "a": "v"}, ns: "n", cluster: "c", wantErr: ErrInvalidLabel, wantErrSubstrings: []string{"longer than 63"}},
		{name: "value too long", pod: map[string]string{"k": long63 + "a"}, ns: "n", cluster: "c", wantErr: ErrInvalidLabel, wantErrSubstrings: []string{`label "k": value longer than 63`}},
		{name: "empty key", pod: map[string]string{"": "v"}, ns: "n", cluster: "c", wantErr: ErrInvalidLabel, wantErrSubstrings: []string{"name is empty"}},
		{name: "empty name after prefix", pod: map[string]string{"example.com/": "v"}, ns: "n", cluster: "c", wantErr: ErrInvalidLabel},
		{name: "two slashes", pod: map[string]string{"a/b/c": "v"}, ns: "n", cluster: "c", wantErr: ErrInvalidLabel},
		{name: "upper-case prefix", pod: map[string]string{"Example.com/a": "v"}, ns: "n", cluster: "c", wantErr: ErrInvalidLabel, wantErrSubstrings: []string{"prefix"}},
		{name: "key starts with dash", pod: map[string]string{"-a": "v"}, ns: "n", cluster: "c", wantErr: ErrInvalidLabel},
		{name: "value ends with dot", pod: map[string]string{"a": "v."}, ns: "n", cluster: "c", wantErr: ErrInvalidLabel},
		{name: "value with =", pod: map[string]string{"a": "x=y"}, ns: "n", cluster: "c", wantErr: ErrInvalidLabel},
		{name: "value with ;", pod: map[string]string{"a": "x;y"}, ns: "n", cluster: "c", wantErr: ErrInvalidLabel},
		{name: "value with space", pod: map[string]string{"a": "x y"}, ns: "n", cluster: "c", wantErr: ErrInvalidLabel},
		{name: "non-ASCII", pod: map[string]string{"a": "é"}, ns: "n", cluster: "c", wantErr: ErrInvalidLabel},
		{name: "bad namespace", ns: "Kube_System", cluster: "c", wantErr: ErrInvalidLabel, wantErrSubstrings: []string{`namespace "Kube_System"`}},
		{name: "empty namespace", cluster: "c", wantErr: ErrInvalidLabel},
		{name: "empty cluster", ns: "n", wantErr: ErrInvalidLabel, wantErrSubstrings: []string{"cluster name"}},
		{name: "cluster with dot", ns: "n", cluster: "a.b", wantErr: ErrInvalidLabel},
		{name: "bad service account", ns: "n", sa: "a..b", cluster: "c", wantErr: ErrInvalidLabel, wantErrSubstrings: []string{"service account"}},
		{name: "long service account is a subdomain", ns: "n", sa: long63 + "." + long63, cluster: "c",
			want: map[string]string{LabelNamespace: "n", LabelServiceAccount: long63 + "." + long63, LabelCluster: "c"}},
		{name: "too many labels", pod: manyLabels(62), ns: "n", cluster: "c", wantErr: ErrTooManyLabels},
		{name: "as many as allowed", pod: manyLabels(61), ns: "n", cluster: "c", want: withReserved(manyLabels(61), "n", "default", "c")},
		{name: "churn labels do not count", pod: withChurn(manyLabels(61)), ns: "n", cluster: "c", want: withReserved(manyLabels(61), "n", "default", "c")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Canonical(tt.pod, tt.ns, tt.sa, tt.cluster)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("err = %v, want %v", err, tt.wantErr)
				}
				for _, s := range tt.wantErrSubstrings {
					if !strings.Contains(err.Error(), s) {
						t.Errorf("err = %q, want it to mention %q", err, s)
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, got.Map()); diff != "" {
				t.Errorf("labels (-want +got):\n%s", diff)
			}
			if err := got.Validate(); err != nil {
				t.Errorf("Validate: %v", err)
			}
		})
	}
}

func manyLabels(n int) map[string]string {
	m := make(map[string]string, n)
	for i := range n {
		m["k"+strings.Repeat("x", i)] = "v"
	}
	return m
}

func withReserved(m map[string]string, ns, sa, cluster string) map[string]string {
	m = maps.Clone(m)
	m[LabelNamespace], m[LabelServiceAccount], m[LabelCluster] = ns, sa, cluster
	return m
}

func withChurn(m map[string]string) map[string]string {
	m = maps.Clone(m)
	for _, k := range ChurnLabels() {
		m[k] = "churn"
	}
	return m
}

func TestCanonicalErrorIsDeterministic(t *testing.T) {
	pod := map[string]string{"b": "bad value", "a": "also bad!", "c": "x y"}
	first, _ := Canonical(pod, "n", "", "c")
	_, err := Canonical(pod, "n", "", "c")
	for range 20 {
		_, err2 := Canonical(pod, "n", "", "c")
		if err2.Error() != err.Error() {
			t.Fatalf("errors differ between runs: %q vs %q", err, err2)
		}
	}
	if !strings.Contains(err.Error(), `label "a"`) || first.Len() != 0 {
		t.Errorf("err = %v, want the first key in sorted order", err)
	}
}

func TestChurnLabels(t *testing.T) {
	want := []string{
		"apps.kubernetes.io/pod-index",
		"batch.kubernetes.io/controller-uid",
		"batch.kubernetes.io/job-completion-index",
		"controller-revision-hash",
		"controller-uid",
		"pod-template-generation",
		"pod-template-hash",
		"rollouts-pod-template-hash",
		"statefulset.kubernetes.io/pod-name",
	}
	if diff := cmp.Diff(want, ChurnLabels()); diff != "" {
		t.Errorf("ChurnLabels (-want +got):\n%s", diff)
	}
	for _, k := range want {
		if err := checkKey(k); err != nil {
			t.Errorf("churn label %q: %v", k, err)
		}
	}
	for _, k := range []string{"job-name", "batch.kubernetes.io/job-name", "app"} {
		if IsChurnLabel(k) {
			t.Errorf("%s is a churn label", k)
		}
	}
}

func TestKey(t *testing.T) {
	tests := []struct {
		name string
		m    map[string]string
		want string
	}{
		{"empty", nil, ""},
		{"empty key and value", map[string]string{"": ""}, "="},
		{"sorted", map[string]string{"b": "2", "a": "1", "a/b": "3"}, "a=1;a/b=3;b=2"},
		{"escapes", map[string]string{"k=": "v;", "%": "=;%"}, "%25=%3D%3B%25;k%3D=v%3B"},
		{"no escape needed", map[string]string{"meshcrypt.io/namespace": "default"}, "meshcrypt.io/namespace=default"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l := FromMap(tt.m)
			if got := l.Key(); got != tt.want {
				t.Errorf("Key = %q, want %q", got, tt.want)
			}
			back, err := parseKey(l.Key())
			if err != nil {
				t.Fatalf("parseKey(%q): %v", l.Key(), err)
			}
			if !back.Equal(l) || !maps.Equal(back.Map(), l.Map()) {
				t.Errorf("parseKey(%q) = %v, want %v", l.Key(), back.Map(), l.Map())
			}
		})
	}
	// Sets that a naive "k=v;" join would confuse.
	pairs := [][2]map[string]string{
		{{"a": "b;c=d"}, {"a": "b", "c": "d"}},
		{{"a=b": "c"}, {"a": "b=c"}},
		{{"a": ""}, {"a=": ""}},
		{{}, {"": ""}},
		{{"a": "%3D"}, {"a": "="}},
	}
	for _, p := range pairs {
		if FromMap(p[0]).Key() == FromMap(p[1]).Key() {
			t.Errorf("%v and %v share Key %q", p[0], p[1], FromMap(p[0]).Key())
		}
	}
}

func TestParseKeyRejectsNonCanonical(t *testing.T) {
	for _, s := range []string{"a", "a=1;a=2", "b=1;a=2", "a=%", "a=%2", "a=%41", "a=%3d", "a=b=c", ";", "a=1;"} {
		if _, err := parseKey(s); err == nil {
			t.Errorf("parseKey(%q) succeeded", s)
		}
	}
}

func TestLabelsAccessors(t *testing.T) {
	l := FromMap(map[string]string{"b": "2", "a": "1", "c": ""})
	if v, ok := l.Get("a"); !ok || v != "1" {
		t.Errorf("Get(a) = %q, %v", v, ok)
	}
	if v, ok := l.Get("c"); !ok || v != "" {
		t.Errorf("Get(c) = %q, %v", v, ok)
	}
	if _, ok := l.Get("d"); ok {
		t.Error("Get(d) found")
	}
	var keys []string
	for k := range l.All() {
		keys = append(keys, k)
	}
	if diff := cmp.Diff([]string{"a", "b", "c"}, keys); diff != "" {
		t.Errorf("All order (-want +got):\n%s", diff)
	}
	if l.Len() != 3 || l.String() != "a=1;b=2;c=" {
		t.Errorf("Len = %d, String = %q", l.Len(), l.String())
	}
	var zero Labels
	if zero.Len() != 0 || zero.Key() != "" || !zero.Equal(FromMap(nil)) {
		t.Error("the zero Labels is not the empty set")
	}
	if l.Compare(zero) <= 0 || zero.Compare(l) >= 0 || l.Compare(l) != 0 {
		t.Error("Compare disagrees with Key order")
	}
}

func TestValidate(t *testing.T) {
	good := withReserved(map[string]string{"app": "x"}, "n", "sa", "c")
	tests := []struct {
		name    string
		mutate  func(map[string]string)
		wantErr error
	}{
		{"good", func(map[string]string) {}, nil},
		{"namespace missing", func(m map[string]string) { delete(m, LabelNamespace) }, ErrInvalidLabel},
		{"cluster missing", func(m map[string]string) { delete(m, LabelCluster) }, ErrInvalidLabel},
		{"bad cluster value", func(m map[string]string) { m[LabelCluster] = "C" }, ErrInvalidLabel},
		{"extra reserved key", func(m map[string]string) { m["meshcrypt.io/x"] = "y" }, ErrReservedLabel},
		{"churn label", func(m map[string]string) { m["pod-template-hash"] = "y" }, ErrInvalidLabel},
		{"bad value", func(m map[string]string) { m["app"] = "a b" }, ErrInvalidLabel},
		{"too many", func(m map[string]string) { maps.Copy(m, manyLabels(62)) }, ErrTooManyLabels},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := maps.Clone(good)
			tt.mutate(m)
			err := FromMap(m).Validate()
			if tt.wantErr == nil && err != nil || tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
				t.Errorf("Validate = %v, want %v", err, tt.wantErr)
			}
		})
	}
}

// parseFuzzMap reads a label map from fuzz input: lines of key NUL value.
func parseFuzzMap(s string) map[string]string {
	m := make(map[string]string)
	if s == "" {
		return m
	}
	for line := range strings.SplitSeq(s, "\n") {
		k, v, _ := strings.Cut(line, "\x00")
		m[k] = v
	}
	return m
}

func FuzzCanonical(f *testing.F) {
	f.Add("app\x00web\ntier\x00frontend", "shop", "web", "c1")
	f.Add("pod-template-hash\x005d8f\napp\x00db", "prod", "", "c1")
	f.Add("meshcrypt.io/namespace\x00kube-system", "evil", "sa", "c1")
	f.Add("example.com/flag\x00", "a", "b.c-d", "e")
	f.Add("a\x00x=y", "n", "s", "c")
	f.Add("Example.com/a\x00v", "n", "s", "c")
	f.Add("", "Kube_System", "", "c")
	f.Fuzz(func(t *testing.T, pod, ns, sa, cluster string) {
		m := parseFuzzMap(pod)
		l, err := Canonical(m, ns, sa, cluster)
		if err != nil {
			if !errors.Is(err, ErrInvalidLabel) && !errors.Is(err, ErrReservedLabel) && !errors.Is(err, ErrTooManyLabels) {
				t.Fatalf("error %v is none of the sentinels", err)
			}
			return
		}
		if err := l.Validate(); err != nil {
			t.Fatalf("Canonical output fails Validate: %v", err)
		}
		if sa == "" {
			sa = DefaultServiceAccount
		}
		want := make(map[string]string)
		for k, v := range m {
			if !IsChurnLabel(k) {
				want[k] = v
			}
		}
		want = withReserved(want, ns, sa, cluster)
		if !maps.Equal(want, l.Map()) {
			t.Fatalf("Canonical = %v, want %v", l.Map(), want)
		}
		back, err := parseKey(l.Key())
		if err != nil || !back.Equal(l) || !maps.Equal(back.Map(), l.Map()) {
			t.Fatalf("parseKey(Key) = %v, %v; want %v", back.Map(), err, l.Map())
		}
		if strings.Contains(l.Key(), "%") {
			t.Fatalf("a canonical set's Key needs escaping: %q", l.Key())
		}
		// Canonicalising the user part of a canonical set again changes nothing.
		user := l.Map()
		delete(user, LabelNamespace)
		delete(user, LabelServiceAccount)
		delete(user, LabelCluster)
		again, err := Canonical(user, ns, sa, cluster)
		if err != nil || again.Key() != l.Key() {
			t.Fatalf("Canonical is not idempotent: %q, %v; want %q", again.Key(), err, l.Key())
		}
	})
}

// FuzzKey checks Key is injective on arbitrary maps: equal Keys if and only if equal maps, and
// parseKey recovers the map.
func FuzzKey(f *testing.F) {
	f.Add("a\x00b;c=d", "a\x00b\nc\x00d")
	f.Add("a=b\x00c", "a\x00b=c")
	f.Add("a\x00", "a=\x00")
	f.Add("", "\x00")
	f.Add("a\x00%3D", "a\x00=")
	f.Add("app\x00web", "app\x00web")
	f.Fuzz(func(t *testing.T, a, b string) {
		ma, mb := parseFuzzMap(a), parseFuzzMap(b)
		la, lb := FromMap(ma), FromMap(mb)
		if (la.Key() == lb.Key()) != maps.Equal(ma, mb) {
			t.Fatalf("maps %q and %q: Keys %q and %q", ma, mb, la.Key(), lb.Key())
		}
		if la.Equal(lb) != maps.Equal(ma, mb) {
			t.Fatalf("Equal(%q, %q) wrong", ma, mb)
		}
		back, err := parseKey(la.Key())
		if err != nil || !maps.Equal(back.Map(), ma) {
			t.Fatalf("parseKey(%q) = %q, %v; want %q", la.Key(), back.Map(), err, ma)
		}
	})
}
