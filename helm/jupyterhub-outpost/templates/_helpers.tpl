{{/* Names and labels (the usual helm create helpers). */}}
{{- define "outpost.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "outpost.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "outpost.selectorLabels" -}}
app.kubernetes.io/name: {{ include "outpost.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "outpost.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "outpost.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: outpost
{{- end }}

{{- define "outpost.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "outpost.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret this chart makes (keys the values give inline, and a generated crypt key). */}}
{{- define "outpost.secretName" -}}
{{- include "outpost.fullname" . }}
{{- end }}

{{- define "outpost.tlsSecretName" -}}
{{- default (include "outpost.secretName" .) .Values.tls.existingSecret }}
{{- end }}

{{/* mTLS: hubs present client certificates signed by ca.crt. */}}
{{- define "outpost.mtls" -}}
{{- if .Values.tls.clientCertificates }}true{{ end }}
{{- end }}

{{/* Refuse values that would give an Outpost that cannot start or that nobody can use
safely; each message says what to set. */}}
{{- define "outpost.validate" -}}
{{- $tls := .Values.tls }}
{{- if and (or $tls.cert $tls.key) (not (and $tls.cert $tls.key)) }}
{{- fail "tls: set tls.cert and tls.key together (PEM)." }}
{{- end }}
{{- if not (or $tls.existingSecret (and $tls.cert $tls.key)) }}
{{- fail "tls: hubs reach the Outpost over TLS. Set tls.existingSecret (a kubernetes.io/tls Secret with tls.crt, tls.key and ca.crt, e.g. from cert-manager) or tls.cert and tls.key (PEM); `jupyterhub-outpost generate-certs` makes a CA, the server certificate and one client certificate per hub." }}
{{- end }}
{{- if and $tls.clientCertificates (not $tls.existingSecret) (not $tls.clientCA) }}
{{- fail "tls.clientCA: hubs authenticate with client certificates (tls.clientCertificates: true); give the CA that signed them (PEM) in tls.clientCA, or ca.crt in tls.existingSecret." }}
{{- end }}
{{- if not (or $tls.clientCertificates .Values.outpost.hubTokens) }}
{{- fail "outpost.hubTokens: with tls.clientCertificates: false hubs authenticate with bearer tokens; give hub name -> \"sha256:...\" (`jupyterhub-outpost hash-token < token-file`)." }}
{{- end }}
{{- if not (or .Values.cryptKey.value .Values.cryptKey.existingSecret) }}
{{- fail "cryptKey: the database needs an encryption key: set cryptKey.existingSecret (a Secret with the key under cryptKey.existingSecretKey) or cryptKey.value; make one with: python -c \"from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())\" (keep it with the database's backups)." }}
{{- end }}
{{- $extra := values .Values.outpost.extraConfig | join "\n" }}
{{- if and $tls.clientCertificates (not .Values.outpost.allowedHubs) (not .Values.outpost.userMapping) (not (contains "user_mapping" $extra)) (not (contains "allowed_hubs" $extra)) }}
{{- fail "outpost.allowedHubs: with mTLS any hub whose certificate the CA signed can connect; name the hubs that may (outpost.allowedHubs: [hub-a]) or say which local account each hub's user is (outpost.userMapping: \"{hub}-{name}\")." }}
{{- end }}
{{- if not (has .Values.database.type (list "sqlite" "postgresql")) }}
{{- fail (printf "database.type: %q is neither sqlite nor postgresql." .Values.database.type) }}
{{- end }}
{{- if and (eq .Values.database.type "postgresql") (not (or .Values.database.url .Values.database.urlExistingSecret)) }}
{{- fail "database: type postgresql needs database.urlExistingSecret (a Secret holding postgresql://user:password@host:5432/db under database.urlExistingSecretKey) or database.url." }}
{{- end }}
{{- if and (eq .Values.database.type "sqlite") (or .Values.database.url .Values.database.urlExistingSecret) }}
{{- fail "database: a URL is set but database.type is sqlite; set database.type: postgresql." }}
{{- end }}
{{- if and (eq .Values.database.type "sqlite") (not .Values.persistence.enabled) }}
{{- fail "persistence.enabled: false with SQLite would lose every server's record at each restart; keep persistence on or use database.type: postgresql." }}
{{- end }}
{{- end }}
