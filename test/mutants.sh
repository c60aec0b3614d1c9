#!/usr/bin/env bash
# Mutation check (docs/proof.md, "Mutations"): for each record of
# test/mutants.txt, puts its defect into a copy of this tree, runs only the
# tests it names, and reports whether they caught it (failed) or it
# survived (they passed). Not part of CI: each mutant is a build of the
# package's tests, a minute or more on two cores.
#
#   test/mutants.sh              # every record
#   test/mutants.sh sweep admin  # the records whose heading contains a word
#
# Each mutation is a literal replacement that must match exactly once in
# its file; one that does not (the code moved on) is reported "stale", not
# survived. First the named tests run once on the unchanged copy: a mutant
# whose tests already fail there is reported "baseline-fails". A mutant that
# does not compile is "no-build". Prints one line per mutant and a table for
# docs/proof.md; exits 1 if any survived, went stale or did not build.
set -euo pipefail
cd "$(dirname "$0")/.."
table=test/mutants.txt
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
copy="$work/tree"
mkdir "$copy"
# The working tree as it is, uncommitted edits included, without .git.
tar --exclude=./.git -cf - . | tar -C "$copy" -xf -

# Parse the table into one file per record: heading, file, tests, pkg,
# old, new.
perl -e '
	my ($dir, $n, %r) = ($ARGV[1], 0);
	sub flush {
		return unless defined $r{head};
		$n++;
		open(my $f, ">", sprintf("%s/%03d", $dir, $n)) or die;
		print $f join("\x00", $r{head}, $r{file} // "", $r{tests} // "", $r{pkg} // ".", $r{old} // "", $r{new} // "");
		close $f;
		%r = ();
	}
	open(my $in, "<", $ARGV[0]) or die "$ARGV[0]: $!";
	while (<$in>) {
		chomp;
		if (/^## (.*)/) { flush(); $r{head} = $1; next }
		next if /^#/ || /^\s*$/;
		if (/^(file|tests|pkg): *(.*)/) { $r{$1} = $2; next }
		if (/^- (.*)/) { $r{old} = $1; next }
		if (/^\+ (.*)/) { $r{new} = $1; next }
		die "$ARGV[0]:$.: not a record line: $_\n";
	}
	flush();
' "$table" "$work" 2>&1
mkdir -p "$work/bin"

# field N of record file R
field() { perl -0 -e 'local $/; my @f = split /\x00/, <STDIN>, -1; print $f[$ARGV[0]]' "$2" <"$1"; }

# apply FILE OLD NEW: replaces the one occurrence (escapes \n, \t); exit 3
# if OLD does not occur exactly once.
apply() {
	perl -0 -e '
		my ($file, $old, $new) = @ARGV;
		for ($old, $new) { s/\\n/\n/g; s/\\t/\t/g }
		local $/; open(my $f, "<", $file) or exit 3; my $s = <$f>; close $f;
		my $count = () = $s =~ /\Q$old\E/g;
		exit 3 if $count != 1;
		$s =~ s/\Q$old\E/$new/;
		open($f, ">", $file) or die; print $f $s; close $f;
	' "$@"
}

# run PKG TESTS LOG: builds PKG's tests in the copy and runs TESTS; exit 2
# if the build fails, else the tests' status.
run() {
	local pkg=$1 tests=$2 log=$3 bin
	bin="$work/bin/$(echo "$pkg" | tr '/.' '__').test"
	(cd "$copy" && go test -c -vet=off -o "$bin" "$pkg") >"$log" 2>&1 || return 2
	local pattern="^($(echo $tests | tr ' ' '|'))\$"
	(cd "$copy/$pkg" && "$bin" -test.count=1 -test.timeout=6m -test.run "$pattern") >>"$log" 2>&1
}

records=()
for r in "$work"/[0-9][0-9][0-9]; do
	head=$(field "$r" 0)
	if [ $# -gt 0 ]; then
		match=
		for w in "$@"; do [[ "$head" == *"$w"* ]] && match=1; done
		[ -n "$match" ] || continue
	fi
	records+=("$r")
done

# The baseline: every named test, per package, on the unchanged copy.
declare -A baseline_failed
for pkg in $(for r in "${records[@]}"; do field "$r" 3; echo; done | sort -u); do
	tests=$(for r in "${records[@]}"; do if [ "$(field "$r" 3)" = "$pkg" ]; then field "$r" 2; echo; fi; done | tr ' ' '\n' | sort -u | tr '\n' ' ')
	echo "== baseline: $pkg: $tests"
	if ! run "$pkg" "$tests" "$work/baseline.log" -v; then
		grep -E '^--- FAIL: ' "$work/baseline.log" || tail -20 "$work/baseline.log"
		for t in $(grep -oE '^--- FAIL: [^ ]+' "$work/baseline.log" | awk '{print $3}'); do
			baseline_failed["$pkg $t"]=1
		done
	fi
done

survived=0 stale=0 broken=0 caught=0
results=()
for r in "${records[@]}"; do
	head=$(field "$r" 0) file=$(field "$r" 1) tests=$(field "$r" 2) pkg=$(field "$r" 3)
	old=$(field "$r" 4) new=$(field "$r" 5)
	start=$(date +%s)
	cp "$copy/$file" "$work/orig"
	status=0
	apply "$copy/$file" "$old" "$new" || status=$?
	if [ "$status" = 3 ]; then
		result=stale
		stale=$((stale + 1))
	else
		status=0
		run "$pkg" "$tests" "$work/mutant.log" || status=$?
		failing=$(grep -oE '^--- FAIL: [^ ]+' "$work/mutant.log" | awk '{print $3}' | tr '\n' ' ' || true)
		pre=
		for t in $tests; do [ -n "${baseline_failed["$pkg $t"]:-}" ] && pre=1; done
		case $status in
		0) result=survived; survived=$((survived + 1)) ;;
		2) result=no-build; broken=$((broken + 1)); tail -5 "$work/mutant.log" ;;
		*) if [ -n "$pre" ]; then result=baseline-fails; else result="caught${failing:+ by ${failing% }}"; caught=$((caught + 1)); fi ;;
		esac
	fi
	cp "$work/orig" "$copy/$file"
	echo "$result: $head ($file; $tests; $(( $(date +%s) - start ))s)"
	# A | in a Markdown table cell, code spans included, must be \|.
	results+=("| $head | \`$file\`: \`${old//|/\\|}\` → \`${new//|/\\|}\` | $(echo $tests | sed 's/\([^ ]*\)/`\1`/g; s/ /, /g') | $result |")
done

echo
echo "| behaviour | mutation | tests | result |"
echo "|---|---|---|---|"
printf '%s\n' "${results[@]}"
echo
echo "mutants: ${#records[@]}: $caught caught, $survived survived, $stale stale, $broken did not build"
[ $((survived + stale + broken)) = 0 ]
