{{- define "modelcache.labels" -}}
app.kubernetes.io/name: modelcache
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end }}

{{- define "modelcache.selector" -}}
app.kubernetes.io/name: modelcache
app.kubernetes.io/component: {{ . }}
{{- end }}

{{- define "modelcache.registry" -}}
dmcr.{{ .Release.Namespace }}.svc:5000
{{- end }}

{{/* the DMCR password: values, else the one already in the cluster, else new */}}
{{- define "modelcache.dmcrPassword" -}}
{{- if .Values.dmcr.password -}}
{{- .Values.dmcr.password -}}
{{- else -}}
{{- $old := lookup "v1" "Secret" .Release.Namespace "dmcr-credentials" -}}
{{- if and $old $old.data (hasKey $old.data "password") -}}
{{- index $old.data "password" | b64dec -}}
{{- else -}}
{{- randAlphaNum 32 -}}
{{- end -}}
{{- end -}}
{{- end }}

{{/* The DMCR pull user's password: generated once, kept across upgrades. */}}
{{- define "modelcache.dmcrPullPassword" -}}
{{- $old := lookup "v1" "Secret" .Release.Namespace "dmcr-pull-credentials" -}}
{{- if and $old $old.data (hasKey $old.data "password") -}}
{{- index $old.data "password" | b64dec -}}
{{- else -}}
{{- randAlphaNum 32 -}}
{{- end -}}
{{- end }}

{{/* Restarts what reads the DMCR push credential only at start (the manager, the
registry's htpasswd). Of the values, not of the rendered Secrets: those carry a
fresh bcrypt salt and, at install, a random password each render. */}}
{{- define "modelcache.dmcrChecksum" -}}
{{- printf "%s:%s" .Values.dmcr.username .Values.dmcr.password | sha256sum | trunc 16 -}}
{{- end }}
