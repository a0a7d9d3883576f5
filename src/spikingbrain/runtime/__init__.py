"""What every capability uses to run and report: lengths, threads, machine records, progress bars, plots, text files, model pairs."""
