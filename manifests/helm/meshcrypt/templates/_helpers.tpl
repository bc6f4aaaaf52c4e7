{{/*
Labels of every object. Names are fixed (meshcrypt-agent, ...), not derived from the release
name: the objects are cluster singletons, and the RBAC, the admission policy and the agent
refer to them by these names.
*/}}
{{- define "meshcrypt.labels" -}}
app.kubernetes.io/name: meshcrypt
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{/* The agent pods' selector; immutable once a DaemonSet exists. */}}
{{- define "meshcrypt.selectorLabels" -}}
app.kubernetes.io/name: meshcrypt
app.kubernetes.io/component: agent
{{- end }}

{{- define "meshcrypt.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/*
Checks values.schema.json cannot express with a clear message. Included by every template, so
any render (install, upgrade, template) fails early.
*/}}
{{- define "meshcrypt.validate" -}}
{{- if ne .Release.Namespace "meshcrypt" }}
{{- fail (printf "meshcrypt must be installed into the namespace meshcrypt, not %q: the agent keeps its identity-collector Lease and reads the IPsec keyring there (use --namespace meshcrypt)" .Release.Namespace) }}
{{- end }}
{{- if and .Values.encryption.strict (eq .Values.encryption.mode "Disabled") }}
{{- fail "encryption.strict needs an encryption mode (WireGuard or IPsec), not Disabled" }}
{{- end }}
{{- if and .Values.encryption.nodeEncryption (eq .Values.encryption.mode "IPsec") }}
{{- fail "encryption.nodeEncryption needs mode WireGuard: IPsec encrypts pod traffic only" }}
{{- end }}
{{- end }}
