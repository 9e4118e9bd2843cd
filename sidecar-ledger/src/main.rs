fn main() -> std::process::ExitCode {
    paystile_ledger::cli::main()
}
